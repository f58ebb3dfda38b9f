"""What the worker returns for one step: plain data keyed by request id."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from pagoda.sample.logprobs import LogprobsLists


@dataclass
class ModelRunnerOutput:
    req_ids: list[str] = field(default_factory=list)            # requests that sampled a token
    sampled_token_ids: list[int] = field(default_factory=list)  # one per req_ids entry
    logprobs: Optional[LogprobsLists] = None                    # rows aligned with req_ids
    prompt_logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    pooler_output: dict[str, np.ndarray] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)        # req_id -> why it failed alone
    graph: bool = False                                          # replayed a CUDA graph
    encoder_seconds: list[float] = field(default_factory=list)  # each vision-encoder run


EMPTY = ModelRunnerOutput()
