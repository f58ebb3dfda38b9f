"""Logprob rows: as tensors while the device computes them and they are copied back behind the
step (`LogprobsTensors`), then as the lists the engine sends to the front end (`LogprobsLists`).
The front end imports this module: torch is imported only where tensors are handled."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    import torch


class LogprobsLists(msgspec.Struct, array_like=True):
    """Logprob rows for consecutive positions: per row the chosen (or actual next prompt) token
    first, then the top-k alternatives, with the chosen token's rank (1 = most likely)."""
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]

    def extend(self, other: "LogprobsLists") -> None:
        self.token_ids += other.token_ids
        self.logprobs += other.logprobs
        self.ranks += other.ranks


@dataclass
class LogprobsTensors:
    """Rows of [chosen, top-k...] token ids (int64 [N, 1 + K]) and logprobs (fp32), and the chosen
    tokens' ranks (int64 [N])."""
    token_ids: torch.Tensor
    logprobs: torch.Tensor
    ranks: torch.Tensor

    def to_host(self) -> "LogprobsTensors":
        """Copies into pinned host memory, queued behind the step's work (no wait)."""
        if not self.token_ids.is_cuda:
            return self
        import torch

        def pinned(t: torch.Tensor) -> torch.Tensor:
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            return h
        return LogprobsTensors(pinned(self.token_ids), pinned(self.logprobs), pinned(self.ranks))

    def lists(self, keep: list[int], start: int = 0) -> LogprobsLists:
        """Rows start, start + 1, ... of host tensors, row i cut to 1 + keep[i] entries."""
        ids = self.token_ids[start:start + len(keep)].tolist()
        lps = self.logprobs[start:start + len(keep)].tolist()
        ranks = self.ranks[start:start + len(keep)].tolist()
        return LogprobsLists([r[:1 + k] for r, k in zip(ids, keep)],
                             [r[:1 + k] for r, k in zip(lps, keep)], ranks)
