"""RMSNorm layer; the math lives in pagoda.kernels (the platform's kernel or its torch twin)."""
from __future__ import annotations

import torch
from torch import nn

from pagoda.platforms import current_platform


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.ops = current_platform().ops

    def scale(self) -> torch.Tensor:
        """What the normalised rows are multiplied by."""
        return self.weight

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: rms_norm(x). With residual: (rms_norm(x + residual), x + residual)."""
        if residual is None:
            return self.ops.rms_norm(x, self.scale(), self.eps)
        return self.ops.fused_add_rms_norm(x, residual, self.scale(), self.eps)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (vision towers: CLIP, SigLIP, Qwen2-VL's ViT); torch's
    kernel on every device."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
