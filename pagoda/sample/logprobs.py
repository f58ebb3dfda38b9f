"""Logprob rows as the sampler returns them and the engine sends them to the front end."""
from __future__ import annotations

import msgspec


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
