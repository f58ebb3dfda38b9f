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


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# transformers' ACT2FN names of the activations vision towers use (non-gated)
_ACTIVATIONS = {
    "gelu": lambda x: torch.nn.functional.gelu(x),
    "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "quick_gelu": _quick_gelu,
    "silu": torch.nn.functional.silu,
    "relu": torch.relu,
}


class Activation(nn.Module):
    """A plain (non-gated) activation named as in a transformers config's `hidden_act`."""

    def __init__(self, name: str):
        super().__init__()
        if name not in _ACTIVATIONS:
            raise ValueError(f"activation {name!r} is not supported (supported: "
                             f"{', '.join(sorted(_ACTIVATIONS))})")
        self.name = name
        self.fn = _ACTIVATIONS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)
