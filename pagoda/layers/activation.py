"""SwiGLU activation on a merged [gate | up] projection."""
from __future__ import annotations

import torch
from torch import nn

from pagoda.platforms import current_platform


class SiluAndMul(nn.Module):
    def __init__(self):
        super().__init__()
        self.ops = current_platform().ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.silu_and_mul(x)
