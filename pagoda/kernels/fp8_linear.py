"""FP8 linear: weights in float8_e4m3 with one scale per output channel, activations quantized
per token on the fly (dynamic scale = the row's amax / 448), y = (x_q * sx) @ (w_q * sw).T.

On GPUs with fp8 tensor cores (compute capability 8.9+: Ada, Hopper) the product runs in
torch._scaled_mm with row-wise scales (twice bf16's tensor-core rate on an H100/H200); elsewhere
the torch reference computes the same quantized product in float32.
"""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] -> (fp8 [R, C], float32 scales [R, 1]): each row scaled to fp8's range."""
    scale = (x.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear_torch(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (any float dtype), w_fp8 [N, K], w_scale float32 [N, 1] -> [M, N] in x's dtype."""
    xq, xs = quantize_rows(x)
    y = (xq.float() * xs) @ (w_fp8.float() * w_scale).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def scaled_mm_supported(device: torch.device, n: int, k: int) -> bool:
    """torch._scaled_mm's needs: fp8 tensor cores and dims that are multiples of 16."""
    if device.type != "cuda" or n % 16 or k % 16:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear_scaled_mm(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as fp8_linear_torch, on the fp8 tensor cores (x in bf16 or fp16)."""
    xq, xs = quantize_rows(x)
    y = torch._scaled_mm(xq, w_fp8.t(), scale_a=xs, scale_b=w_scale.view(1, -1), out_dtype=x.dtype)
    return y + bias.to(x.dtype) if bias is not None else y
