"""Weight-only int8 matmul for the CPU (the C kernel in cpu_int8.c) and its torch reference.

Weights are uint8 in groups of 32 along K with a float32 scale and minimum per group (exact for
llama.cpp's Q4_0/Q4_1 blocks); activations stay float32. The kernel is compiled with the system C compiler
on first use by cpu_build. `available()` is False where it cannot be built; callers then keep
float weights.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch

from pagoda.kernels import cpu_build

GROUP = 32
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {"pagoda_w8_gemm": [_P, _I64, _P, _P, _P, _I64, _I64, _P, _P]}


def _lib():
    return cpu_build.load("cpu_int8", _SIGNATURES)


def available() -> bool:
    return _lib() is not None


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights [N, K] (K a multiple of 32) -> uint8 [N, K] and float32 scale, min [N, K // 32]
    with w ~= q * scale + min per group of 32.

    Each group takes the better of two grids: min..max in 255 steps (exact for Q4_0/Q4_1 blocks,
    which span their 16 levels) and -128..127 steps of max|w| / 127 (exact for Q8_0 blocks)."""
    N, K = w.shape
    g = w.float().reshape(N, K // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    best = None
    for scale, mn in (((hi - lo) / 255.0, lo),
                      (g.abs().amax(-1) / 127.0, -128.0 * g.abs().amax(-1) / 127.0)):
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        q = torch.round((g - mn[..., None]) * inv[..., None]).clamp(0, 255)
        err = (q * scale[..., None] + mn[..., None] - g).abs().amax(-1)
        if best is None:
            best = [q, scale, mn, err]
        else:
            pick = err < best[3]
            best = [torch.where(pick[..., None], q, best[0]), torch.where(pick, scale, best[1]),
                    torch.where(pick, mn, best[2]), torch.minimum(err, best[3])]
    q, scale, mn, _ = best
    return (q.to(torch.uint8).reshape(N, K).contiguous(), scale.contiguous(), mn.contiguous())


def dequantize_weight(qw: torch.Tensor, sw: torch.Tensor, mw: torch.Tensor) -> torch.Tensor:
    N, K = qw.shape
    return (qw.float().reshape(N, -1, GROUP) * sw[..., None] + mw[..., None]).reshape(N, K)


def int8_matmul_torch(x: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, mw: torch.Tensor,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference: multiply by the dequantized weights."""
    y = x.float() @ dequantize_weight(qw, sw, mw).T
    return y + bias.float() if bias is not None else y


def int8_matmul(x: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, mw: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y[M, N] = x[M, K] @ dequant(qw)[N, K]^T (+ bias), float32, through the C kernel."""
    x = x.float().contiguous()
    M, K = x.shape
    N = qw.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    _lib().pagoda_w8_gemm(x.data_ptr(), M, qw.data_ptr(), sw.data_ptr(), mw.data_ptr(), N, K,
                          bias.data_ptr() if bias is not None else None, y.data_ptr())
    return y
