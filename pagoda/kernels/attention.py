"""Paged attention over the KV cache: plain-torch reference (CPU and CUDA).

Layouts (shared with the Triton kernels in this package):
- kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]; kv_cache[0] = K, kv_cache[1] = V.
- q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim] (new tokens of
  this step, flattened over requests in order).
- slot_mapping: int64 [num_tokens], block_id * block_size + offset; negative = padding, not written.
- query_start_loc: int32 [num_reqs + 1]; seq_lens: int32 [num_reqs] (KV length after this step);
  block_tables: int32 [num_reqs, max_blocks]. Request r's queries sit at positions
  seq_lens[r] - q_len + i and attend causally to every cached position up to their own.
- sliding_window (None = global): a query at position p sees only keys in (p - window, p]. Blocks
  wholly before every query's window are never read (their block-table entries may be stale:
  the KV-cache manager is free to hand them to other requests).
- logits_soft_cap (None = off): scores become cap * tanh(scores / cap) before the softmax
  (Gemma 2's attn_logit_softcapping).
- kv_quant (None = the cache holds K/V in the model's dtype): a quantized cache (int8, int4,
  fp8; kv_quant.py has the formats). Its values are quantized on write and only the blocks a
  step reads are dequantized; for int4 the cache's last dim is head_dim / 2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pagoda.kernels.kv_quant import KVQuant, read_blocks, write_cache_torch


def reshape_and_cache_torch(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                            slot_mapping: torch.Tensor, kv_quant: KVQuant | None = None) -> None:
    """Write this step's K/V into the paged cache at slot_mapping (padding slots < 0 skipped)."""
    if kv_quant is not None:
        return write_cache_torch(k, v, kv_cache, kv_quant, slot_mapping)
    nb, bs = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, nb * bs, kv_cache.shape[3], kv_cache.shape[4])
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    flat[0].index_copy_(0, slot_mapping, k.to(flat.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(flat.dtype))


def window_start(pos: int, sliding_window: int | None) -> int:
    """First key position a query at `pos` may see."""
    return 0 if sliding_window is None else max(0, pos - sliding_window + 1)


def _gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, start: int, end: int,
               kv_quant: KVQuant | None = None, dtype: torch.dtype = torch.float32):
    """[end - start, kv_heads, head_dim] K and V of keys start..end-1 of one request, read
    through its block table (blocks before `start`'s are not touched); a quantized cache's
    values come back as `dtype`."""
    bs = kv_cache.shape[2]
    first, last = start // bs, (end + bs - 1) // bs
    blocks = block_table[first:last].long()
    lo = start - first * bs
    k = read_blocks(kv_cache, kv_quant, 0, blocks, dtype)
    v = read_blocks(kv_cache, kv_quant, 1, blocks, dtype)
    shape = ((last - first) * bs, k.shape[2], k.shape[3])
    return k.reshape(shape)[lo:lo + end - start], v.reshape(shape)[lo:lo + end - start]


def _scores(q: torch.Tensor, kt: torch.Tensor, scale: float, cap: float | None) -> torch.Tensor:
    """Scaled (and soft-capped) q @ kt in float32, or float64 for float64 inputs."""
    s = torch.matmul(q, kt)
    s = (s.float() if s.dtype != torch.float64 else s) * scale
    return s if cap is None else torch.tanh(s / cap) * cap


def paged_attention_torch(q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                          seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                          query_start_loc_cpu: list[int] | None = None,
                          seq_lens_cpu: list[int] | None = None,
                          step_cache: dict | None = None, sliding_window: int | None = None,
                          logits_soft_cap: float | None = None,
                          kv_quant: KVQuant | None = None) -> torch.Tensor:
    """Causal attention of each request's new queries over its cached KV (written beforehand).

    Requests with one query token (decodes) are batched into one padded matmul; each
    multi-token request (prefill chunk) gets its own SDPA call. Host copies of the offsets can be
    passed to avoid device syncs.
    """
    num_heads = q.shape[1]
    group = num_heads // kv_cache.shape[3]
    qsl = query_start_loc_cpu if query_start_loc_cpu is not None else query_start_loc.tolist()
    sl = seq_lens_cpu if seq_lens_cpu is not None else seq_lens.tolist()
    out = torch.empty_like(q)
    decodes = [r for r in range(len(sl)) if qsl[r + 1] - qsl[r] == 1]
    if decodes:
        _decode_batch(q, kv_cache, block_tables, scale, qsl, sl, decodes, out, group,
                      step_cache if step_cache is not None else {}, sliding_window, logits_soft_cap,
                      kv_quant)
    prefill_attention_torch(q, kv_cache, block_tables, scale, qsl, sl, out, sliding_window,
                            logits_soft_cap, kv_quant)
    return out


def prefill_attention_torch(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            scale: float, qsl: list[int], sl: list[int], out: torch.Tensor,
                            sliding_window: int | None = None,
                            logits_soft_cap: float | None = None,
                            kv_quant: KVQuant | None = None) -> None:
    """Requests with more than one query token (prefill chunks), one SDPA call each, into out."""
    group = q.shape[1] // kv_cache.shape[3]
    for r in range(len(sl)):
        qs, qe = qsl[r], qsl[r + 1]
        ql = qe - qs
        if ql <= 1:
            continue
        n = sl[r]
        lo = window_start(n - ql, sliding_window)  # the first query's window start
        k, v = _gather_kv(kv_cache, block_tables[r], lo, n, kv_quant, q.dtype)
        qr = q[qs:qe].transpose(0, 1).unsqueeze(0)                    # [1, H, ql, D]
        kr = k.transpose(0, 1).repeat_interleave(group, 0).unsqueeze(0)  # [1, H, n - lo, D]
        vr = v.transpose(0, 1).repeat_interleave(group, 0).unsqueeze(0)
        # query i sits at absolute position n - ql + i and sees keys up to it (within the window)
        qpos = torch.arange(n - ql, n, device=q.device).unsqueeze(1)
        kpos = torch.arange(lo, n, device=q.device).unsqueeze(0)
        mask = kpos <= qpos
        if sliding_window is not None:
            mask &= kpos > qpos - sliding_window
        if logits_soft_cap is None:
            o = F.scaled_dot_product_attention(qr.to(kr.dtype), kr, vr, attn_mask=mask, scale=scale)
        else:  # SDPA has no soft cap
            scores = _scores(qr.to(kr.dtype), kr.transpose(-1, -2), scale, logits_soft_cap)
            p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).to(vr.dtype)
            o = torch.matmul(p, vr)
        out[qs:qe] = o[0].transpose(0, 1).to(out.dtype)


def _decode_batch(q, kv_cache, block_tables, scale, qsl, sl, decodes, out, group, memo,
                  sliding_window=None, logits_soft_cap=None, kv_quant=None):
    bs = kv_cache.shape[2]
    key = ("decode", sliding_window)  # sliding and global layers of one step differ
    if key not in memo:
        dev = q.device
        rows = torch.tensor(decodes, device=dev)
        tok = torch.tensor([qsl[r] for r in decodes], device=dev)
        lens = torch.tensor([sl[r] for r in decodes], device=dev)
        # each request reads the blocks of its own window only: first block .. its last block
        first = [window_start(sl[r] - 1, sliding_window) // bs for r in decodes]
        nblk = max((sl[r] + bs - 1) // bs - f for r, f in zip(decodes, first))
        cols = torch.tensor(first, device=dev).unsqueeze(1) + torch.arange(nblk, device=dev)
        width = block_tables.shape[1]
        bt = block_tables[rows].long().gather(1, cols.clamp(max=width - 1))  # [B, nblk]
        kpos = (cols.unsqueeze(2) * bs + torch.arange(bs, device=dev)).reshape(len(decodes), -1)
        valid = kpos < lens.unsqueeze(1)
        if sliding_window is not None:
            valid &= kpos > lens.unsqueeze(1) - 1 - sliding_window
        memo[key] = (tok, nblk, bt, valid)
    tok, nblk, bt, valid = memo[key]
    B = len(decodes)
    kvh, d = kv_cache.shape[3], q.shape[2]
    k = read_blocks(kv_cache, kv_quant, 0, bt, q.dtype).reshape(B, nblk * bs, kvh, d)  # [B, L, kvh, D]
    v = read_blocks(kv_cache, kv_quant, 1, bt, q.dtype).reshape(B, nblk * bs, kvh, d)
    qb = q[tok].view(B, kvh, group, d)                                # [B, kvh, G, D]
    k = k.permute(0, 2, 3, 1)                                         # [B, kvh, D, L]
    scores = _scores(qb.to(k.dtype), k, scale, logits_soft_cap)         # [B, kvh, G, L]
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    # slots past a request's length hold whatever was there (maybe NaN/Inf): 0 * NaN = NaN
    v = v.masked_fill(~valid[:, :, None, None], 0)
    o = torch.matmul(p, v.permute(0, 2, 1, 3))                        # [B, kvh, G, D]
    out[tok] = o.reshape(B, kvh * group, d).to(out.dtype)


def _varlen_layout(cu: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For sequences at [cu[i], cu[i+1]) of a flat batch: the flat index of each (sequence,
    offset) cell of a padded [B, L] grid (padding points at row 0), a mask of the real cells, and
    the flat positions of the real cells in grid order."""
    lens = [b - a for a, b in zip(cu, cu[1:])]
    L = max(lens, default=0)
    offs = torch.arange(L, device=device)
    host = torch.tensor([cu[:-1], lens])
    if torch.device(device).type == "cuda":  # no wait for the device's queued work
        host = host.pin_memory().to(device, non_blocking=True)
    starts, lens_t = host[0], host[1]
    valid = offs.unsqueeze(0) < lens_t.unsqueeze(1)   # [B, L]
    index = torch.where(valid, starts.unsqueeze(1) + offs.unsqueeze(0), torch.zeros_like(offs))
    return index, valid, index[valid]


def varlen_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens: torch.Tensor, scale: float,
                           cu_seqlens_cpu: list[int] | None = None,
                           step_cache: dict | None = None) -> torch.Tensor:
    """Non-causal attention within each sequence of a flattened batch (encoders).

    q: [T, H, D]; k, v: [T, Hkv, D]; sequence i owns rows cu_seqlens[i]:cu_seqlens[i+1]. The
    sequences are padded into one [B, H, L, D] SDPA call with the padding masked out of the keys.
    """
    cu = cu_seqlens_cpu if cu_seqlens_cpu is not None else cu_seqlens.tolist()
    memo = step_cache if step_cache is not None else {}
    H, group = q.shape[1], q.shape[1] // k.shape[1]
    lens = {b - a for a, b in zip(cu, cu[1:])}
    if len(lens) == 1:  # sequences of one length (a vision tower's images): no padding, no mask
        B, L = len(cu) - 1, lens.pop()

        def seqs(x):  # [T, h, D] -> [B, h, L, D]
            return x.view(B, L, x.shape[1], x.shape[2]).transpose(1, 2)
        kg, vg = seqs(k), seqs(v)
        if group > 1:
            kg, vg = kg.repeat_interleave(group, 1), vg.repeat_interleave(group, 1)
        qg = seqs(q)
        o = torch.nn.functional.scaled_dot_product_attention(qg, kg.to(qg.dtype), vg.to(qg.dtype),
                                                             scale=scale)
        return o.transpose(1, 2).reshape(q.shape).to(q.dtype)
    if "varlen" not in memo:  # the same for every layer of the step
        memo["varlen"] = _varlen_layout(cu, q.device)
    index, valid, flat = memo["varlen"]

    def grid(x):  # [T, h, D] -> [B, h, L, D]
        return x[index].permute(0, 2, 1, 3)
    qg = grid(q)
    kg, vg = grid(k), grid(v)
    if group > 1:
        kg, vg = kg.repeat_interleave(group, 1), vg.repeat_interleave(group, 1)
    mask = valid[:, None, None, :]
    o = torch.nn.functional.scaled_dot_product_attention(qg, kg.to(qg.dtype), vg.to(qg.dtype),
                                                         attn_mask=mask, scale=scale)
    out = torch.empty_like(q)
    out[flat] = o.permute(0, 2, 1, 3)[valid].to(out.dtype)
    return out
