"""Rotary position embedding (neox / rotate-half) in Triton, in place on q and k.

Plain-torch twin in rotary.py (same cos|sin cache layout). One program per token rotates every
head of q and k for that token, so cos/sin are loaded once per token; q and k may be strided
views of the fused qkv projection output (only the last dim must be dense).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, stride_h, cos, sin, NUM_HEADS: tl.constexpr, H_PAD: tl.constexpr,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    h = tl.arange(0, H_PAD)[:, None]
    j = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < NUM_HEADS) & (j < HALF)
    p1 = x_ptr + h * stride_h + j
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cache_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_cache, NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr,
                   QH_PAD: tl.constexpr, KH_PAD: tl.constexpr,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, HALF_PAD)[None, :]
    cs = cache_ptr + pos * stride_cache + j
    cos = tl.load(cs, mask=j < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cs + HALF, mask=j < HALF, other=0.0).to(tl.float32)
    t64 = t.to(tl.int64)
    _rotate_heads(q_ptr + t64 * stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, QH_PAD, HALF, HALF_PAD)
    _rotate_heads(k_ptr + t64 * stride_kt, stride_kh, cos, sin, NUM_K_HEADS, KH_PAD, HALF, HALF_PAD)


def rotary_embedding_triton(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as rotary_embedding_torch, written into q and k (returned)."""
    num_tokens, nq, _ = q.shape
    nk = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    half = cos_sin_cache.shape[-1] // 2
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            positions, q, k, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos_sin_cache.stride(0), NUM_Q_HEADS=nq, NUM_K_HEADS=nk,
            QH_PAD=triton.next_power_of_2(nq), KH_PAD=triton.next_power_of_2(nk),
            HALF=half, HALF_PAD=triton.next_power_of_2(half), num_warps=4)
    return q, k
