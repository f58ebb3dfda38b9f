"""--quantization fp8: a linear layer's weight in float8_e4m3 with a scale per output channel,
quantized from the loaded bf16/fp32 weight; activations are scaled per token at each call
(kernels/fp8_linear.py: torch._scaled_mm on fp8 tensor cores, a float32 reference elsewhere)."""
from __future__ import annotations

from typing import Optional

import torch

from pagoda.kernels.fp8_linear import (fp8_linear_scaled_mm, fp8_linear_torch, quantize_rows,
                                       scaled_mm_supported)


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
