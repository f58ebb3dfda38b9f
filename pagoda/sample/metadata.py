"""What the sampler needs to know about the rows it samples this step (one row per request that
finished its prompt), built by the model runner from its persistent per-request state."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pagoda.sampling_params import SamplingParams


@dataclass
class SamplingMetadata:
    params: list[SamplingParams]
    generators: list[Optional[torch.Generator]]   # seeded requests' own generators
    num_output_tokens: list[int]                  # tokens generated before this step's
    # token histories for penalties, read only when a row has one (None otherwise)
    prompt_token_ids: Optional[list[list[int]]]
    output_token_ids: Optional[list[list[int]]]
    all_plain_greedy: bool                        # argmax of the raw logits for every row

    @property
    def max_num_logprobs(self) -> int:
        """Largest logprobs asked for (-1: no row wants logprobs)."""
        return max((p.logprobs for p in self.params if p.logprobs is not None), default=-1)
