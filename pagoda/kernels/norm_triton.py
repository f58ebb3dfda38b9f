"""RMSNorm and fused residual-add + RMSNorm in Triton (plain-torch twins in norm.py).

One program per row; the row is read once, reduced in fp32 and written once, so the fused
variant moves 3 row-sized tensors instead of the 5 an add followed by a norm would. Inputs of 2
or 3 dims may be strided views (Qwen3's per-head q/k norm runs on [tokens, heads, head_dim]
slices of the fused qkv output) as long as the normalised dim is dense.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_offset(row, inner, stride_outer, stride_inner):
    return (row // inner).to(tl.int64) * stride_outer + (row % inner).to(tl.int64) * stride_inner


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, inner, sx_o, sx_i, sr_o, sr_i, eps,
                     N: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x_off = _row_offset(row, inner, sx_o, sx_i) + cols
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0)
    if ADD:  # residual <- x + residual, rounded to the activation dtype as torch would
        r_off = _row_offset(row, inner, sr_o, sr_i) + cols
        x = (x.to(tl.float32) + tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32))
        x = x.to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + r_off, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.math.rsqrt(tl.sum(xf * xf, 0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * N + cols, (xf * inv * w).to(out_ptr.dtype.element_ty),
             mask=mask)


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """(tensor, rows, inner, stride_outer, stride_inner) for a 2-D or 3-D view, last dim dense."""
    if t.stride(-1) != 1 or t.dim() > 3:
        t = t.reshape(-1, t.shape[-1]).contiguous() if t.dim() > 3 else t.contiguous()
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() == 2:
        return t, t.shape[0], 1, t.stride(0), 0
    return t, t.shape[0] * t.shape[1], t.shape[1], t.stride(0), t.stride(1)


def _launch(x, residual, weight, eps):
    n = x.shape[-1]
    xv, rows, inner, sxo, sxi = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    add = residual is not None
    if add:
        assert residual.shape == x.shape and residual.stride(-1) == 1 and residual.dim() <= 3
        _, _, _, sro, sri = _rows(residual)
    else:
        residual, sro, sri = xv, 0, 0
    if rows:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(rows,)](xv, residual, weight, out, inner, sxo, sxi, sro, sri, eps,
                                  N=n, BLOCK=block, ADD=add,
                                  num_warps=min(16, max(1, block // 256)))
    return out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same result as rms_norm_torch, in a new tensor."""
    return _launch(x, None, weight, eps)


def fused_add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as fused_add_rms_norm_torch; `residual` is updated in place and returned."""
    return _launch(x, residual, weight, eps), residual
