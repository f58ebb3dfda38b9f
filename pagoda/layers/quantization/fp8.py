"""--quantization fp8: a linear layer's weight in float8_e4m3 with a scale per output channel,
quantized from the loaded bf16/fp32 weight; activations are scaled per token at each call
(kernels/fp8_linear.py: torch._scaled_mm on fp8 tensor cores, a float32 reference elsewhere).

FP8 checkpoints (quant_method fp8: float8_e4m3 weights with `weight_scale` per tensor or per
channel, or `weight_scale_inv` per [128, 128] block as in DeepSeek-V3 / Qwen3-FP8) are
dequantized while loading and quantized per channel here like a bf16 checkpoint: within fp8's
own rounding of the original, not bit-exact to it."""
from __future__ import annotations

from typing import Optional

import torch

from pagoda.kernels.fp8_linear import (fp8_linear_scaled_mm, fp8_linear_torch, quantize_rows,
                                       scaled_mm_supported)


def checkpoint_scales(tensors: dict, shape: tuple[int, int], block: Optional[tuple[int, int]]
                      ) -> torch.Tensor:
    """The multiplier of an FP8 checkpoint shard's fp8 values, broadcastable to `shape` [N, K]."""
    if "weight_scale_inv" in tensors:
        s = tensors["weight_scale_inv"].float()
        bn, bk = block or (128, 128)
        n, k = shape
        return s.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    if "weight_scale" not in tensors:
        raise ValueError("--quantization fp8: a layer of the FP8 checkpoint has no weight_scale")
    s = tensors["weight_scale"].float()
    return s.reshape(-1, 1) if s.numel() > 1 else s.reshape(1, 1)


class Fp8LinearMethod:
    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        self.out_features, k = weight.shape
        self.qweight, self.scale = quantize_rows(weight)   # [N, K] fp8, [N, 1] float32
        self.bias = bias
        self.fast = scaled_mm_supported(weight.device, self.out_features, k) and weight.dtype in (
            torch.bfloat16, torch.float16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        fn = fp8_linear_scaled_mm if self.fast and x2.shape[0] > 0 else fp8_linear_torch
        return fn(x2, self.qweight, self.scale, self.bias).reshape(*shape[:-1], self.out_features)
