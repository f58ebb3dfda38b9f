"""Gated activations on a merged [gate | up] projection, plain torch: SiLU-and-mul (SwiGLU;
reference for the Triton kernel beside it) and GELU-and-mul (GeGLU, Gemma)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * d] = [gate | up] -> silu(gate) * up, [..., d]."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def gelu_and_mul_torch(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """x: [..., 2 * d] = [gate | up] -> gelu(gate) * up, [..., d] ("tanh": gelu_pytorch_tanh)."""
    d = x.shape[-1] // 2
    return F.gelu(x[..., :d], approximate=approximate) * x[..., d:]
