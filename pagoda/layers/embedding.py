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
        self.gguf = None

    def quantize(self, method: str):
        """A packed or int8 copy for the matmul (the file's GGUF blocks when it has them; int4
        packs a float head as Q8_0, as llama.cpp keeps its output matrix at 8 bits); a tied
        embedding keeps its float table for lookups."""
        from pagoda.layers.linear import Int8Matmul, int8_supported
        from pagoda.layers.quantization import gguf as gguf_format
        vocab, hidden = self.weight.shape
        packed = gguf_format.pack(method, self.weight,
                                  gguf_format.GGUFLinearMethod([vocab], hidden), gguf_format.Q8_0)
        if packed is not None:
            self.gguf = packed.process(None)
        elif int8_supported(self.weight):
            self.int8 = Int8Matmul(self.weight.data, None)
        else:
            return
        if not self.tied:
            self.weight = None

    def drop_gguf(self):
        if getattr(self.weight, "gguf", None) is not None:
            self.weight.gguf = None

    def quantize_int8(self):  # the name engines before quantize_model() call
        self.quantize("int8")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.gguf is not None:
            return self.gguf(h)
        if self.int8 is not None:
            return self.int8(h)
        return F.linear(h, self.weight)
