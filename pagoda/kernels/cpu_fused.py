"""Python entry points of cpu_fused.c: RMSNorm (+ residual add), rotary, SiLU-and-mul for float32
CPU tensors, each falling back to its torch reference (norm.py, rotary.py, activation.py) for
other dtypes, devices or layouts, or where the C kernels cannot be built."""
from __future__ import annotations

import ctypes

import torch

from pagoda.kernels import cpu_build
from pagoda.kernels.activation import silu_and_mul_torch
from pagoda.kernels.norm import fused_add_rms_norm_torch, rms_norm_torch
from pagoda.kernels.rotary import rotary_embedding_torch

_P, _I64, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "pagoda_rms_norm": [_P, _P, _P, _P, _P, _I64, _I64, _F],
    "pagoda_rotary": [_P, _I64, _I64, _I64, _I64, _I64, _P, _P],
    "pagoda_silu_and_mul": [_P, _P, _I64, _I64],
}


def _lib():
    return cpu_build.load("cpu_fused", _SIGNATURES)


def _ok(*ts: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ts) and _lib() is not None


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if not (_ok(x, weight) and x.is_contiguous()):
        return rms_norm_torch(x, weight, eps)
    out = torch.empty_like(x)
    H = x.shape[-1]
    _lib().pagoda_rms_norm(x.data_ptr(), None, weight.data_ptr(), out.data_ptr(), None,
                           x.numel() // H, H, eps)
    return out


def fused_add_rms_norm_cpu(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not (_ok(x, residual, weight) and x.is_contiguous() and residual.is_contiguous()):
        return fused_add_rms_norm_torch(x, residual, weight, eps)
    out, res = torch.empty_like(x), torch.empty_like(x)
    H = x.shape[-1]
    _lib().pagoda_rms_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
                           res.data_ptr(), x.numel() // H, H, eps)
    return out, res


def _rotatable(x: torch.Tensor) -> bool:
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]


def rotary_embedding_cpu(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         cos_sin_cache: torch.Tensor, cos_sin=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q and k in place (they are this step's fresh projections) and returns them.
    `cos_sin`, for the torch fallback, may be the gathered pair or a function returning it."""
    if not (_ok(q, k, cos_sin_cache) and _rotatable(q) and _rotatable(k)
            and positions.dtype == torch.int64 and positions.is_contiguous()):
        return rotary_embedding_torch(positions, q, k, cos_sin_cache, cos_sin)
    rot = cos_sin_cache.shape[1]
    for x in (q, k):
        _lib().pagoda_rotary(x.data_ptr(), x.shape[0], x.stride(0), x.shape[1], x.shape[2], rot,
                             positions.data_ptr(), cos_sin_cache.data_ptr())
    return q, k


def silu_and_mul_cpu(x: torch.Tensor) -> torch.Tensor:
    if not (_ok(x) and x.is_contiguous()):
        return silu_and_mul_torch(x)
    d = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype)
    _lib().pagoda_silu_and_mul(x.data_ptr(), out.data_ptr(), x.numel() // (2 * d), d)
    return out
