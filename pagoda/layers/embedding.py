"""Token embedding and the LM head (which may share the embedding's weight), vocab-parallel:
with tensor parallelism each rank holds a contiguous slice of the vocabulary (padded to equal
slices); a lookup is summed over the ranks and the logits are gathered from them."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class _VocabSlice(nn.Module):
    """This rank's rows [start, end) of a vocabulary cut into equal (padded) slices."""

    def __init__(self, vocab_size: int):
        super().__init__()
        from pagoda.distributed.parallel_state import tp_rank, tp_size
        self.vocab_size, self.tp = vocab_size, tp_size()
        self.rows = -(-vocab_size // self.tp) if self.tp > 1 else vocab_size
        self.start = tp_rank() * self.rows
        self.end = min(self.start + self.rows, vocab_size)

    def load_full(self, param: str, tensor) -> None:
        """This rank's rows of the checkpoint's [vocab, hidden] table."""
        if shape_of(tensor) != (self.vocab_size, self.weight.shape[1]):
            raise ValueError(f"shape mismatch for {type(self).__name__}: checkpoint {shape_of(tensor)} vs "
                             f"model ({self.vocab_size}, {self.weight.shape[1]})")
        from pagoda.layers.linear import is_held
        if is_held(tensor):  # an untied head kept packed by the loader: taken after loading
            return
        rows = tensor[self.start:self.end]
        rows = rows if isinstance(rows, torch.Tensor) else torch.as_tensor(rows)
        self.weight.data[:rows.shape[0]].copy_(rows)


class VocabEmbedding(_VocabSlice):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__(vocab_size)
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden_size), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return F.embedding(ids, self.weight)
        from pagoda.distributed.parallel_state import all_reduce
        mine = (ids >= self.start) & (ids < self.end)
        out = F.embedding(torch.where(mine, ids - self.start, 0), self.weight)
        return all_reduce(out * mine.unsqueeze(-1).to(out.dtype))


def shape_of(tensor) -> tuple:
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tuple(tensor.get_shape())


def tensor_rows(tensor) -> int:
    return shape_of(tensor)[0]


class LMHead(_VocabSlice):
    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None):
        super().__init__(vocab_size)
        self.tied = tied_to is not None
        self.weight = tied_to.weight if tied_to is not None else nn.Parameter(
            torch.zeros(self.rows, hidden_size), requires_grad=False)
        self.int8 = None
        self.gguf = None

    def quantize_int8(self, groups=None):
        """An int8 copy for the matmul (`groups`: already at hand, from a GGUF's blocks); a tied
        embedding keeps its float table for lookups."""
        from pagoda.layers.linear import Int8Matmul, int8_supported
        if not int8_supported(self.weight):
            return
        self.int8 = Int8Matmul(self.weight.data, None, groups)
        if not self.tied:
            self.weight = None

    def quantize_packed(self, method: str, blocks=None):
        """The file's GGUF blocks kept packed for the matmul (`blocks`: [the head's], or None);
        int4 packs a float head as Q8_0, as llama.cpp keeps its output matrix at 8 bits; else
        int8. A tied embedding keeps its float table for lookups."""
        from pagoda.layers.quantization import gguf as gguf_format
        packed = gguf_format.pack(method, self.weight, [self.weight.shape[0]], blocks, gguf_format.Q8_0)
        if packed is None:
            self.quantize_int8()
            return
        self.gguf = packed.process(None)
        if not self.tied:
            self.weight = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.gguf is not None:
            logits = self.gguf(h)
        elif self.int8 is not None:
            logits = self.int8(h)
        else:
            logits = F.linear(h, self.weight)
        if self.tp == 1:
            return logits
        from pagoda.distributed.parallel_state import all_gather_last_dim
        return all_gather_last_dim(logits)[..., :self.vocab_size]
