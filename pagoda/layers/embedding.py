"""Token embedding and the LM head (which may share the embedding's weight)."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class LMHead(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None):
        super().__init__()
        self.tied = tied_to is not None
        self.weight = tied_to.weight if tied_to is not None else nn.Parameter(
            torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.int8 = None

    def quantize_int8(self, groups=None):
        """An int8 copy for the matmul; a tied embedding keeps its float table for lookups."""
        from pagoda.layers.linear import Int8Matmul, int8_supported
        if not int8_supported(self.weight):
            return
        self.int8 = Int8Matmul(self.weight.data, None, groups)
        if not self.tied:
            self.weight = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.int8 is not None:
            return self.int8(h)
        return F.linear(h, self.weight)
