"""Kernel dispatch: the Triton kernel for CUDA tensors when Triton imports, else the torch twin.

Every function keeps its reference's signature (extra arguments are keyword-only hints the
torch path ignores), so layers call one name and run on CPU and GPU alike.
"""
from __future__ import annotations

import torch

from .activation import silu_and_mul_torch
from .attention import paged_attention_torch, reshape_and_cache_torch
from .kv_quant import KVQuant
from .norm import fused_add_rms_norm_torch, rms_norm_torch
from .rotary import rotary_embedding_torch

try:
    from .activation_triton import silu_and_mul_triton
    from .attention_triton import paged_attention_triton, reshape_and_cache_triton
    from .norm_triton import fused_add_rms_norm_triton, rms_norm_triton
    from .rotary_triton import rotary_embedding_triton
    HAS_TRITON = True
except ImportError:  # no triton wheel (CPU-only installs, macOS)
    HAS_TRITON = False


def use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and t.is_cuda


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, kv_quant: KVQuant | None = None) -> None:
    """Write k, v [T, kv_heads, D] into kv_cache at slot_mapping (slots < 0 skipped), quantized
    when kv_quant says how."""
    if use_triton(kv_cache):
        return reshape_and_cache_triton(k, v, kv_cache, slot_mapping, kv_quant)
    return reshape_and_cache_torch(k, v, kv_cache, slot_mapping, kv_quant)


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                    query_start_loc_cpu: list[int] | None = None,
                    seq_lens_cpu: list[int] | None = None, *, max_query_len: int | None = None,
                    max_seq_len: int | None = None, out: torch.Tensor | None = None,
                    sliding_window: int | None = None,
                    logits_soft_cap: float | None = None,
                    kv_quant: KVQuant | None = None) -> torch.Tensor:
    """Causal attention of each request's new queries over its paged KV (see attention.py).

    On the GPU pass max_query_len (a Python int; 1 = decode-only step, which enables split-K).
    It is derived from query_start_loc_cpu when that is given instead. max_seq_len only sizes
    split-K; leave it None under CUDA graphs (the block-table width is used). `out`, if given,
    receives the result (a preallocated buffer for graph capture). sliding_window and
    logits_soft_cap are the layer's (None = off), as in attention.py; kv_quant the cache's
    format (None = the model's dtype).
    """
    if use_triton(q):
        if max_query_len is None and query_start_loc_cpu is not None:
            qsl = query_start_loc_cpu
            max_query_len = max((b - a for a, b in zip(qsl, qsl[1:])), default=0)
        if max_seq_len is None and seq_lens_cpu is not None:
            max_seq_len = max(seq_lens_cpu, default=0)
        return paged_attention_triton(q, kv_cache, query_start_loc, seq_lens, block_tables, scale,
                                      max_query_len=max_query_len, max_seq_len=max_seq_len,
                                      out=out, sliding_window=sliding_window,
                                      logits_soft_cap=logits_soft_cap, kv_quant=kv_quant)
    res = paged_attention_torch(q, kv_cache, query_start_loc, seq_lens, block_tables, scale,
                                query_start_loc_cpu, seq_lens_cpu, sliding_window=sliding_window,
                                logits_soft_cap=logits_soft_cap, kv_quant=kv_quant)
    if out is not None:
        out.copy_(res)
        return out
    return res


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual). On the GPU `residual` is updated in place."""
    if use_triton(x):
        return fused_add_rms_norm_triton(x, residual, weight, eps)
    return fused_add_rms_norm_torch(x, residual, weight, eps)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k). On the GPU q and k are rotated in place and returned."""
    if use_triton(q):
        return rotary_embedding_triton(positions, q, k, cos_sin_cache)
    return rotary_embedding_torch(positions, q, k, cos_sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return silu_and_mul_triton(x)
    return silu_and_mul_torch(x)
