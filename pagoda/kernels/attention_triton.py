"""Paged attention and the KV-cache write in Triton (the plain-torch twins live in attention.py).

Layouts are those documented in attention.py. One attention kernel serves every batch shape:

- A program owns one *query tile* (up to BLOCK_Q consecutive new tokens of one request) and one
  KV head, and computes all GROUP query heads that share that KV head at once: the tile's rows
  are (token, head-in-group) pairs, so K and V are read once per tile instead of once per head.
- Tiles are numbered without a host sync: request r's tiles start at
  query_start_loc[r] // BLOCK_Q + r, so num_tokens // BLOCK_Q + num_reqs programs always cover
  the batch and each finds its request by binary search (spare programs exit at once). When no
  request has more than BLOCK_Q new tokens (decode steps), program r is request r.
- Split-K: the keys of a tile can be cut into NUM_SPLITS segments handled by separate programs,
  each writing a normalised partial output and its log-sum-exp; a second small kernel merges
  them. The dispatcher uses this for decode batches too small to fill the GPU.
- Online softmax in fp32 with exp2 (the scale is folded into log2 units). K and V are gathered
  through the block table a BLOCK_N-token tile at a time, whatever the page size.
- Sliding window (SLIDING): a tile's keys start at its first query's window start, so key tiles
  (and pages) wholly before it are never loaded, and loads below it are masked off: those
  blocks may already belong to someone else. Tiles that straddle some query's window start take
  the masked path; split-K divides only the keys in range.
- Soft cap (SOFTCAP): cap * tanh(s / cap) on the scaled scores, before the softmax.
- Quantized cache (KV_QUANT: 1 int8, 2 int4, 3 fp8; formats in kv_quant.py): the cache-write
  kernel quantizes each token's K/V per head as it stores them, and the attention loop
  dequantizes each K/V tile right after loading it (int8/int4 with the tile's per-token scale
  and zero, fp8 with the tensor's scale), before the dot products in the model's dtype. Only
  the quantized bytes cross memory.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pagoda.kernels.kv_quant import FP8_MAX, KVQuant

# The interpreter's tl.dot multiplies bf16 bit patterns as integers (seen with triton 3.9), so
# under TRITON_INTERPRET the operands are upcast to fp32 first; rounding points stay the same.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _reshape_and_cache_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                              stride_kt, stride_kh, stride_vt, stride_vh,
                              stride_cb, stride_cs, stride_ch,
                              NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                              H_PAD: tl.constexpr, D_PAD: tl.constexpr,
                              PAGE: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, H_PAD)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs + h * stride_ch + d
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_rows(x, ok, LEVELS: tl.constexpr):
    """Asymmetric per-row quantization of x [H, N] (the (scale, zero) pair rounded to float16
    first, as in kv_quant.quantize): (codes as int32, scale fp16 [H], zero fp16 [H])."""
    lo = tl.min(tl.where(ok, x, float("inf")), 1)
    hi = tl.max(tl.where(ok, x, float("-inf")), 1)
    s16 = ((hi - lo) / LEVELS).to(tl.float16)
    z16 = lo.to(tl.float16)
    sf = s16.to(tl.float32)
    inv = tl.where(sf > 0, 1.0 / sf, 0.0)
    q = tl.floor((x - z16.to(tl.float32)[:, None]) * inv[:, None] + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), LEVELS).to(tl.int32)
    return q, s16, z16


@triton.jit
def _store_quantized(x_ptr, stride_xt, stride_xh, t, cache_ptr, params_ptr, dst, p_dst, h, h_ok,
                     scale, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, QUANT: tl.constexpr,
                     FP8_MAX: tl.constexpr):
    """Quantize one token's [heads, head_dim] K (or V) and store it at dst (+ its params)."""
    src = x_ptr + t * stride_xt + h * stride_xh
    if QUANT == 2:  # int4: element 2j in byte j's low nibble, 2j + 1 in its high nibble
        j = tl.arange(0, D_PAD // 2)[None, :]
        ok = h_ok & (2 * j < HEAD_DIM)
        even = tl.load(src + 2 * j, mask=ok, other=0.0).to(tl.float32)
        odd = tl.load(src + 2 * j + 1, mask=ok, other=0.0).to(tl.float32)
        lo = tl.minimum(tl.min(tl.where(ok, even, float("inf")), 1),
                        tl.min(tl.where(ok, odd, float("inf")), 1))
        hi = tl.maximum(tl.max(tl.where(ok, even, float("-inf")), 1),
                        tl.max(tl.where(ok, odd, float("-inf")), 1))
        s16 = ((hi - lo) / 15).to(tl.float16)
        z16 = lo.to(tl.float16)
        sf = s16.to(tl.float32)
        inv = tl.where(sf > 0, 1.0 / sf, 0.0)[:, None]
        zf = z16.to(tl.float32)[:, None]
        qe = tl.minimum(tl.maximum(tl.floor((even - zf) * inv + 0.5), 0.0), 15.0).to(tl.int32)
        qo = tl.minimum(tl.maximum(tl.floor((odd - zf) * inv + 0.5), 0.0), 15.0).to(tl.int32)
        tl.store(cache_ptr + dst + j, (qe | (qo << 4)).to(tl.uint8), mask=ok)
        tl.store(params_ptr + p_dst, s16[:, None], mask=h_ok)
        tl.store(params_ptr + p_dst + 1, z16[:, None], mask=h_ok)
    else:
        d = tl.arange(0, D_PAD)[None, :]
        ok = h_ok & (d < HEAD_DIM)
        x = tl.load(src + d, mask=ok, other=0.0).to(tl.float32)
        if QUANT == 1:
            q, s16, z16 = _quantize_rows(x, ok, 255)
            tl.store(cache_ptr + dst + d, q.to(tl.uint8), mask=ok)
            tl.store(params_ptr + p_dst, s16[:, None], mask=h_ok)
            tl.store(params_ptr + p_dst + 1, z16[:, None], mask=h_ok)
        else:  # fp8, saturated
            y = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
            tl.store(cache_ptr + dst + d, y.to(cache_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _reshape_and_cache_quant_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, kp_ptr, vp_ptr,
                                    slot_ptr, k_scale, v_scale,
                                    stride_kt, stride_kh, stride_vt, stride_vh,
                                    stride_cb, stride_cs, stride_ch, stride_pb, stride_ps, stride_ph,
                                    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                                    H_PAD: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
                                    QUANT: tl.constexpr, FP8_MAX: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, H_PAD)[:, None]
    h_ok = h < NUM_KV_HEADS
    dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs + h * stride_ch
    p_dst = (slot // PAGE) * stride_pb + (slot % PAGE) * stride_ps + h * stride_ph
    _store_quantized(k_ptr, stride_kt, stride_kh, t, k_cache_ptr, kp_ptr, dst, p_dst, h, h_ok,
                     k_scale, HEAD_DIM, D_PAD, QUANT, FP8_MAX)
    _store_quantized(v_ptr, stride_vt, stride_vh, t, v_cache_ptr, vp_ptr, dst, p_dst, h, h_ok,
                     v_scale, HEAD_DIM, D_PAD, QUANT, FP8_MAX)


def reshape_and_cache_triton(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                             slot_mapping: torch.Tensor, kv_quant: KVQuant | None = None) -> None:
    """Same contract as reshape_and_cache_torch; k/v may be strided views (last dim dense)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and kv_cache.stride(-1) == 1
    kc, vc = kv_cache[0], kv_cache[1]
    h_pad, d_pad = triton.next_power_of_2(num_kv_heads), triton.next_power_of_2(head_dim)
    if kv_quant is None:
        _reshape_and_cache_kernel[(num_tokens,)](
            k, v, kc, vc, slot_mapping,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            kc.stride(0), kc.stride(1), kc.stride(2),
            NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, H_PAD=h_pad, D_PAD=d_pad,
            PAGE=kv_cache.shape[2])
        return
    params = kv_quant.params if kv_quant.params is not None else kv_cache  # fp8: unused
    kp, vp = params[0], params[1]
    _reshape_and_cache_quant_kernel[(num_tokens,)](
        k, v, kc, vc, kp, vp, slot_mapping, kv_quant.k_scale, kv_quant.v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), kp.stride(0), kp.stride(1), kp.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, H_PAD=h_pad, D_PAD=max(d_pad, 2),
        PAGE=kv_cache.shape[2], QUANT=kv_quant.code, FP8_MAX=FP8_MAX.get(kv_quant.kind, 0.0))


@triton.jit
def _load(ptr, mask, USE_MASK: tl.constexpr):
    if USE_MASK:
        return tl.load(ptr, mask=mask, other=0.0)
    return tl.load(ptr)


@triton.jit
def _tanh(x):
    """tanh from exp2 (no tanh in tl.math); odd, so computed on |x| where exp2 cannot overflow."""
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))   # exp(-2|x|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _load_kv(cache_ptr, p_ptr, off, p_off, d, ok, scale, USE_MASK: tl.constexpr,
             QUANT: tl.constexpr, KEY_AXIS: tl.constexpr):
    """A K or V tile from the cache, dequantized to fp32 (QUANT 0: as stored). off / p_off:
    per-key offsets of the data and of the (scale, zero) pairs; keys run along KEY_AXIS (1 for
    K^T, 0 for V)."""
    if KEY_AXIS == 1:
        koff, dd, pk = off[None, :], d[:, None], p_off[None, :]
    else:
        koff, dd, pk = off[:, None], d[None, :], p_off[:, None]
    # one return: compiled Triton checks every return of a function against the others, taken
    # branch or not (the interpreter does not), and QUANT 0 returns the stored dtype
    if QUANT == 0:
        x = _load(cache_ptr + koff + dd, ok, USE_MASK)
    elif QUANT == 3:
        x = _load(cache_ptr + koff + dd, ok, USE_MASK).to(tl.float32) * scale
    else:
        if QUANT == 2:
            byte = _load(cache_ptr + koff + dd // 2, ok, USE_MASK).to(tl.int32)
            code = (byte >> ((dd % 2) * 4)) & 15
        else:
            code = _load(cache_ptr + koff + dd, ok, USE_MASK).to(tl.int32)
        sc = _load(p_ptr + pk + dd * 0, ok, USE_MASK).to(tl.float32)  # broadcast over the tile
        zr = _load(p_ptr + pk + 1 + dd * 0, ok, USE_MASK).to(tl.float32)
        x = code.to(tl.float32) * sc + zr
    return x


@triton.jit
def _attend_tile(q, q_pos, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, kp_ptr, vp_ptr, bt_row,
                 kv_head_off, p_head_off, t, k_lo, n_keys, window, qk_scale, cap_in, cap_out,
                 k_sc, v_sc, d, d_ok, stride_cb, stride_cs, stride_pb, stride_ps,
                 PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 D_MASK: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
                 UPCAST: tl.constexpr, PREC: tl.constexpr, QUANT: tl.constexpr):
    """One BLOCK_N-key step of the online softmax; MASKED: causal, length and window masks
    needed (keys outside [k_lo, n_keys) are not even loaded)."""
    k_pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = k_pos < n_keys
    if SLIDING:
        k_ok = k_ok & (k_pos >= k_lo)
    page = _load(bt_row + k_pos // PAGE, k_ok, MASKED).to(tl.int64)
    kv_off = page * stride_cb + (k_pos % PAGE) * stride_cs + kv_head_off
    p_off = page * stride_pb + (k_pos % PAGE) * stride_ps + p_head_off
    k = _load_kv(k_cache_ptr, kp_ptr, kv_off, p_off, d, k_ok[None, :] & d_ok[:, None], k_sc,
                 MASKED or D_MASK, QUANT, 1).to(q.dtype)                    # [D_PAD, BLOCK_N]
    if SOFTCAP:  # cap_in = scale / cap, cap_out = cap * log2(e)
        s = _tanh(_mm(q, k, UPCAST, PREC) * cap_in) * cap_out
    else:
        s = _mm(q, k, UPCAST, PREC) * qk_scale
    if MASKED:
        see = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        if SLIDING:
            see = see & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(see, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with no key yet
    p = tl.math.exp2(s - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_kv(v_cache_ptr, vp_ptr, kv_off, p_off, d, k_ok[:, None] & d_ok[None, :], v_sc,
                 MASKED or D_MASK, QUANT, 0).to(q.dtype)                    # [BLOCK_N, D_PAD]
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, UPCAST, PREC)
    return m_new, l_i, acc


# num_reqs and the block-table stride change from step to step; specializing on them (value 1,
# multiple of 16) would compile new variants in the middle of a run, costing seconds each
@triton.jit(do_not_specialize=["num_reqs", "stride_bt", "window"])
def _paged_attn_kernel(out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, kp_ptr, vp_ptr, block_tables_ptr,
                       seq_lens_ptr, qsl_ptr, part_out_ptr, part_lse_ptr,
                       num_reqs, qk_scale, window, cap_in, cap_out, k_sc, v_sc,
                       stride_qt, stride_qh, stride_ot, stride_oh,
                       stride_cb, stride_cs, stride_ch, stride_bt, stride_pb, stride_ps, stride_ph,
                       NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                       HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
                       BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       NUM_SPLITS: tl.constexpr, TILE_IS_REQ: tl.constexpr,
                       SPLIT_MASK: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
                       UPCAST: tl.constexpr, PREC: tl.constexpr, QUANT: tl.constexpr):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    if TILE_IS_REQ:
        req = tile
        first_tile = tile
    else:  # largest req with qsl[req] // BLOCK_Q + req <= tile
        lo = tile * 0  # a tensor from the start: the loop carries it
        hi = lo + num_reqs
        while hi - lo > 1:
            mid = (lo + hi) // 2
            go_right = tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= tile
            lo = tl.where(go_right, mid, lo)
            hi = tl.where(go_right, hi, mid)
        req = lo
        first_tile = tl.load(qsl_ptr + req) // BLOCK_Q + req
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    q0 = (tile - first_tile) * BLOCK_Q          # first query of this tile, within the request
    if q0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    ctx_len = seq_len - q_len                    # keys cached before this step's tokens

    rows = tl.arange(0, BLOCK_M)
    qi = q0 + rows // GROUP_PAD
    head = kvh * GROUP + rows % GROUP_PAD
    row_ok = (rows < BLOCK_Q * GROUP_PAD) & (rows % GROUP_PAD < GROUP) & (qi < q_len)
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    tok = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = ctx_len + qi

    # keys this tile needs: (its first query's window start) .. (position of its last query),
    # cut into NUM_SPLITS segments
    n_keys = tl.minimum(seq_len, ctx_len + q0 + BLOCK_Q)
    n_tiles = tl.cdiv(n_keys, BLOCK_N)
    if SLIDING:
        k_lo = tl.maximum(ctx_len + q0 - window + 1, 0)
    else:
        k_lo = 0
    t_lo = k_lo // BLOCK_N
    per_split = tl.cdiv(n_tiles - t_lo, NUM_SPLITS)
    t_begin = t_lo + split * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    bt_row = block_tables_ptr + req.to(tl.int64) * stride_bt
    kv_head_off = kvh * stride_ch
    p_head_off = kvh * stride_ph
    # key tiles inside every query's window (from t_open) and below every query of this tile
    # (up to n_full) need no mask: [t_begin, t_a) masked, [t_a, t_b) free, [t_b, t_end) masked
    if SPLIT_MASK:
        n_full = tl.minimum(n_keys, ctx_len + q0 + 1) // BLOCK_N
        if SLIDING:  # the last query's window start, rounded up to a tile
            q_last = ctx_len + tl.minimum(q0 + BLOCK_Q, q_len) - 1
            t_open = tl.cdiv(tl.maximum(q_last - window + 1, 0), BLOCK_N)
            t_a = tl.minimum(tl.maximum(t_open, t_begin), t_end)
        else:
            t_a = t_begin
        t_b = tl.maximum(tl.minimum(n_full, t_end), t_a)
    else:
        t_a = t_begin
        t_b = t_begin
    for t in range(t_begin, t_a):
        m_i, l_i, acc = _attend_tile(q, q_pos, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, kp_ptr,
                                     vp_ptr, bt_row, kv_head_off, p_head_off, t, k_lo, n_keys,
                                     window, qk_scale, cap_in, cap_out, k_sc, v_sc, d, d_ok,
                                     stride_cb, stride_cs, stride_pb, stride_ps, PAGE, BLOCK_N,
                                     True, HEAD_DIM != D_PAD, SLIDING, SOFTCAP, UPCAST, PREC, QUANT)
    for t in range(t_a, t_b):
        m_i, l_i, acc = _attend_tile(q, q_pos, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, kp_ptr,
                                     vp_ptr, bt_row, kv_head_off, p_head_off, t, k_lo, n_keys,
                                     window, qk_scale, cap_in, cap_out, k_sc, v_sc, d, d_ok,
                                     stride_cb, stride_cs, stride_pb, stride_ps, PAGE, BLOCK_N,
                                     False, HEAD_DIM != D_PAD, SLIDING, SOFTCAP, UPCAST, PREC, QUANT)
    for t in range(t_b, t_end):
        m_i, l_i, acc = _attend_tile(q, q_pos, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, kp_ptr,
                                     vp_ptr, bt_row, kv_head_off, p_head_off, t, k_lo, n_keys,
                                     window, qk_scale, cap_in, cap_out, k_sc, v_sc, d, d_ok,
                                     stride_cb, stride_cs, stride_pb, stride_ps, PAGE, BLOCK_N,
                                     True, HEAD_DIM != D_PAD, SLIDING, SOFTCAP, UPCAST, PREC, QUANT)

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        part = (tok * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], o, mask=o_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(tl.maximum(l_i, 1e-30)))
        tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(out_ptr, part_out_ptr, part_lse_ptr, stride_ot, stride_oh,
                         NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, S_PAD)
    s_ok = s < NUM_SPLITS
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    part = (tok * NUM_HEADS + head) * NUM_SPLITS + s
    lse = tl.load(part_lse_ptr + part, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.math.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
    w = tl.where(s_ok, w, 0.0)
    o = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :],
                mask=s_ok[:, None] & d_ok[None, :] & (w[:, None] > 0), other=0.0)
    total = tl.sum(w, 0)
    o = tl.sum(o * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + tok * stride_ot + head * stride_oh + d, o.to(out_ptr.dtype.element_ty),
             mask=d_ok)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def decode_num_splits(num_reqs: int, num_kv_heads: int, max_seq_len: int, sm_count: int,
                      min_keys_per_split: int = 64, max_splits: int = 32) -> int:
    """Split-K only while (request, KV head) programs number under two per SM; then aim at
    about four per SM, each with at least one 64-key tile. Fitted on an H100 (CUDA-graph
    replays, Llama-3-8B heads): B=1 ctx 1024 -> 16 splits (8.8 us vs 31.6 unsplit), B=1 ctx
    4096 -> 32 (14.9 vs 115.5 us), B=4 ctx 4096 -> 16, B=16 ctx 2048 -> 4-5, B=64 -> 1."""
    programs = max(1, num_reqs * num_kv_heads)
    if programs >= 2 * sm_count:
        return 1
    want = triton.cdiv(4 * sm_count, programs)
    return max(1, min(want, triton.cdiv(max_seq_len, min_keys_per_split), max_splits))


def launch_config(dtype: torch.dtype, decode: bool) -> dict:
    """Default tile sizes; `rows` is query rows per program (tokens x heads of a KV group).

    split_mask: run the key tiles that need no mask through a mask-free loop. prec: tl.dot
    precision for fp32 inputs (tf32x3 keeps fp32 accuracy on the tensor cores).
    """
    base = dict(split_mask=True, prec="tf32x3" if dtype == torch.float32 else "tf32")
    if decode:  # rows: the KV group, padded to >= 16
        return dict(base, block_n=64, num_warps=4, num_stages=2)
    if dtype == torch.float32:  # tf32x3 at 32 rows: 36 TFLOP/s vs 1 for ieee at 64 (H100)
        return dict(base, rows=32, block_n=32, num_warps=4, num_stages=2)
    return dict(base, rows=64, block_n=64, num_warps=4, num_stages=2)


def paged_attention_triton(q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                           seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                           max_query_len: int | None = None, max_seq_len: int | None = None,
                           num_splits: int | None = None, out: torch.Tensor | None = None,
                           tune: dict | None = None, sliding_window: int | None = None,
                           logits_soft_cap: float | None = None,
                           kv_quant: KVQuant | None = None) -> torch.Tensor:
    """Causal paged attention, same contract as paged_attention_torch, no host syncs.

    max_query_len: the longest new-token count in the batch; 1 (all decodes) selects the decode
    launch with split-K. None means "unknown": the general launch, always correct.
    max_seq_len: bound on seq_lens, only used to size split-K (default: the block table's
    capacity, which is fixed and so safe under CUDA graphs). num_splits overrides the choice;
    tune overrides launch_config's tile sizes (benchmark sweeps).
    Rows of `out` past query_start_loc[-1] (padding tokens) are left unspecified.
    """
    num_tokens, num_heads, head_dim = q.shape  # the cache's last dim is head_dim / 2 for int4
    num_kv_heads, page = kv_cache.shape[3], kv_cache.shape[2]
    num_reqs = seq_lens.shape[0]
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    assert q.stride(-1) == 1 and kv_cache.stride(-1) == 1
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or num_reqs == 0:
        return out
    decode = max_query_len == 1
    cfg = {**launch_config(q.dtype, decode), **(tune or {})}
    block_q = 1 if decode else max(1, cfg["rows"] // group_pad)
    block_m = max(16, block_q * group_pad)
    tile_is_req = max_query_len is not None and max_query_len <= block_q
    if tile_is_req:
        num_tiles = num_reqs
    else:
        num_tiles = num_tokens // block_q + num_reqs
    if num_splits is None:
        num_splits = 1
        if decode:
            cap = max_seq_len if max_seq_len is not None else block_tables.shape[1] * page
            if sliding_window is not None:  # keys read per request, at most (+ a tile's slack)
                cap = min(cap, sliding_window + page)
            num_splits = decode_num_splits(num_reqs, num_kv_heads, cap, _sm_count(q.device))
    kc, vc = kv_cache[0], kv_cache[1]
    params = kv_quant.params if kv_quant is not None and kv_quant.params is not None else kv_cache
    kp, vp = params[0], params[1]  # (scale, zero) pairs of int8/int4 (else unused)
    k_sc, v_sc = (kv_quant.k_scale, kv_quant.v_scale) if kv_quant is not None else (1.0, 1.0)
    if num_splits > 1:
        part_out = torch.empty(num_tokens, num_heads, num_splits, head_dim,
                               dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32,
                               device=q.device)
    else:
        part_out = part_lse = out  # unused
    d_pad = triton.next_power_of_2(head_dim)
    _paged_attn_kernel[(num_tiles, num_kv_heads, num_splits)](
        out, q, kc, vc, kp, vp, block_tables, seq_lens, query_start_loc, part_out, part_lse,
        num_reqs, scale * _LOG2E, sliding_window or 0,
        scale / logits_soft_cap if logits_soft_cap else 0.0,
        logits_soft_cap * _LOG2E if logits_soft_cap else 0.0, k_sc, v_sc,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), block_tables.stride(0),
        kp.stride(0), kp.stride(1), kp.stride(2),
        NUM_HEADS=num_heads, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, D_PAD=d_pad,
        PAGE=page, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=cfg["block_n"],
        NUM_SPLITS=num_splits, TILE_IS_REQ=tile_is_req, SPLIT_MASK=cfg["split_mask"],
        SLIDING=sliding_window is not None, SOFTCAP=bool(logits_soft_cap), UPCAST=_INTERPRET, PREC=cfg["prec"],
        QUANT=kv_quant.code if kv_quant is not None else 0,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out, part_out, part_lse, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, D_PAD=d_pad, NUM_SPLITS=num_splits,
            S_PAD=triton.next_power_of_2(num_splits), num_warps=4)
    return out
