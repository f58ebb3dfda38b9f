"""Gated activations on a merged [gate | up] projection: SwiGLU (Llama family), GeGLU (Gemma)."""
from __future__ import annotations

import torch
from torch import nn

from pagoda.kernels.activation import gelu_and_mul_torch
from pagoda.platforms import current_platform


class SiluAndMul(nn.Module):
    def __init__(self):
        super().__init__()
        self.ops = current_platform().ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.silu_and_mul(x)


class GeluAndMul(nn.Module):
    """gelu(gate) * up; torch's GELU runs on either device (no fused kernel yet)."""

    def __init__(self, approximate: str = "tanh"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_and_mul_torch(x, self.approximate)
