"""Paged attention on the CPU: decode tokens through the C kernel in cpu_attention.c, prefill
chunks through the torch reference (one SDPA call per request, already efficient on the CPU).
The C kernel reads a float32 cache or an int8 one (dequantizing each block of positions inside
its loop); other formats (int4, fp8), non-float32 queries, or no build fall back to the torch
reference entirely."""
from __future__ import annotations

import ctypes

import torch

from pagoda.kernels import cpu_build
from pagoda.kernels.attention import paged_attention_torch, prefill_attention_torch
from pagoda.kernels.kv_quant import KVQuant

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "pagoda_paged_decode": [_P, _I64, _P, _P, _I64, _P, _I64, _I64, _I64, _I64, _P, _I64, _P,
                            _I64, ctypes.c_float, _I64, ctypes.c_float, _P],
    "pagoda_paged_decode_int8": [_P, _I64, _P, _P, _I64, _P, _P, _P, _I64, _I64, _I64, _I64, _P,
                                 _I64, _P, _I64, ctypes.c_float, _I64, ctypes.c_float, _P],
    "pagoda_kv_write_int8": [_P, _P, _I64, _I64, _P, _P, _P, _P, _I64, _I64, _I64, _I64],
}


def _lib():
    return cpu_build.load("cpu_attention", _SIGNATURES)


def reads(kv_cache: torch.Tensor, kv_quant: KVQuant | None) -> bool:
    """Whether the C decode kernel reads this cache: float32, or int8 codes with their scales."""
    if kv_quant is None:
        return kv_cache.dtype == torch.float32
    return kv_quant.kind == "int8" and kv_cache.dtype == torch.uint8


def kv_write_int8(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, kv_quant: KVQuant,
                  slot_mapping: torch.Tensor) -> None:
    """kv_quant.write_cache_torch for an int8 cache in C (bit for bit); k and v float32
    [T, kv_heads, D] rows of one stride (views into a fused qkv projection work)."""
    assert k.dtype == v.dtype == torch.float32 and k.stride() == v.stride() and k.stride(-1) == 1
    assert k.stride(1) == k.shape[2]
    _, nb, bs, kvh, d = kv_cache.shape
    slots = slot_mapping.to(torch.int64).contiguous()
    _lib().pagoda_kv_write_int8(k.data_ptr(), v.data_ptr(), k.stride(0), k.shape[0],
                                slots.data_ptr(), kv_cache.data_ptr(), kv_quant.scales.data_ptr(),
                                kv_quant.zeros.data_ptr(), nb, bs, kvh, d)


def paged_attention_cpu(q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                        seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                        query_start_loc_cpu: list[int] | None = None,
                        seq_lens_cpu: list[int] | None = None,
                        step_cache: dict | None = None, sliding_window: int | None = None,
                        logits_soft_cap: float | None = None,
                        kv_quant: KVQuant | None = None) -> torch.Tensor:
    """Same contract as paged_attention_torch."""
    num_heads = q.shape[1]
    usable = (q.device.type == "cpu" and q.dtype == torch.float32 and reads(kv_cache, kv_quant)
              and num_heads // kv_cache.shape[3] <= 64 and _lib() is not None)
    if not usable:
        return paged_attention_torch(q, kv_cache, query_start_loc, seq_lens, block_tables, scale,
                                     query_start_loc_cpu, seq_lens_cpu, step_cache,
                                     sliding_window, logits_soft_cap, kv_quant)
    qsl = query_start_loc_cpu if query_start_loc_cpu is not None else query_start_loc.tolist()
    sl = seq_lens_cpu if seq_lens_cpu is not None else seq_lens.tolist()
    memo = step_cache if step_cache is not None else {}
    if "cpu_decode" not in memo:  # same for every layer of the step
        decodes = [r for r in range(len(sl)) if qsl[r + 1] - qsl[r] == 1]
        memo["cpu_decode"] = (torch.tensor([qsl[r] for r in decodes], dtype=torch.int64),
                              torch.tensor(decodes, dtype=torch.int64),
                              block_tables.to(torch.int32).contiguous(),
                              seq_lens.to(torch.int32).contiguous(),
                              len(decodes) < len(sl))
    tok, req, bt, lens, has_prefill = memo["cpu_decode"]
    q = q.contiguous()
    out = torch.empty_like(q)
    if tok.numel():
        _, nb, bs, kvh, d = kv_cache.shape
        head = (q.data_ptr(), q.stride(0), tok.data_ptr(), req.data_ptr(), tok.numel(), kv_cache.data_ptr())
        tail = (nb, bs, kvh, d, bt.data_ptr(), bt.shape[1], lens.data_ptr(), num_heads, scale,
                sliding_window or 0, logits_soft_cap or 0.0, out.data_ptr())
        if kv_quant is None:
            _lib().pagoda_paged_decode(*head, *tail)
        else:
            _lib().pagoda_paged_decode_int8(*head, kv_quant.scales.data_ptr(),
                                            kv_quant.zeros.data_ptr(), *tail)
    if has_prefill:
        prefill_attention_torch(q, kv_cache, block_tables, scale, qsl, sl, out, sliding_window,
                                logits_soft_cap, kv_quant)
    return out
