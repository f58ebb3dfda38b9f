"""What the scheduler tells the worker about one step: plain data only (ids, token ids, block
ids, params), so the worker needs nothing from the engine and the step could be sent to another
process or tensor-parallel rank as it is.

The worker keeps each request's state (tokens, blocks) from step to step; a step names the new
requests in full and, for requests it already knows, only what changed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from pagoda.pooling_params import PoolingParams
from pagoda.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: Optional[SamplingParams]
    pooling_params: Optional[PoolingParams]
    block_ids: list[int]
    num_computed_tokens: int       # prefix-cache hits: already in the KV cache
    token_type_ids: Optional[list[int]] = None
    mm_features: Optional[list] = None   # images (messages.MultiModalFeature), with their data
    # encoder-decoder models: the audio's log-mel features [mel bins, frames], sent once (the
    # worker keeps what the encoder makes of them for the request's life)
    encoder_features: Optional[np.ndarray] = None


@dataclass
class CachedRequestData:
    """Requests the worker has seen before, in parallel lists."""
    req_ids: list[str] = field(default_factory=list)
    # True: the request was preempted and starts again with the blocks in new_block_ids (which
    # then replace its old ones); False: new_block_ids are appended
    resumed_from_preemption: list[bool] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)


@dataclass
class GrammarBitmask:
    """Structured outputs: the token bitmask of this step's constrained requests that sample a
    token (pagoda.structured_output fills it; the runner applies it to their logits rows only).

    Row i of `bitmask` (int32 [len(req_ids), ceil(vocab_size / 32)], on the host, bit set = token
    allowed) belongs to req_ids[i]; tokens at or past `vocab_size` (the grammar's vocabulary, the
    tokenizer's ids: a model's padded ids) are never allowed (0: the bitmask's width). On
    overlapped steps a row depends on the token the previous step sampled, which is read back
    only after this step was launched: the bitmask then comes from `fill`, which the runner calls
    once the step's forward pass is queued (so the grammar work runs while the device computes);
    `get()` does that at most once. A fill leaves out requests no longer constrained (their
    grammar ended, or gone), so `req_ids` is final only after `get()`.
    """
    req_ids: list[str]
    bitmask: Any = None                       # torch.int32 tensor (host; pinned on CUDA)
    fill: Optional[Callable[[], None]] = None
    error: Optional[BaseException] = None     # fill failed: every get() raises it
    vocab_size: int = 0

    def get(self):
        if self.bitmask is None and self.fill is not None:
            fill, self.fill = self.fill, None
            try:
                fill()
            except BaseException as e:
                self.error = e
        if self.error is not None:
            raise self.error
        return self.bitmask


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: CachedRequestData = field(default_factory=CachedRequestData)
    # req_id -> tokens to compute this step, in the order the batch is laid out
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    # requests that ended since the last step (finished, aborted): the worker forgets them
    finished_req_ids: set[str] = field(default_factory=set)
    # images: req_id -> indices of its mm_features the encoder runs on this step; hashes of
    # encoder outputs the encoder cache dropped (the worker frees them)
    encoder_inputs: dict[str, list[int]] = field(default_factory=dict)
    free_encoder_hashes: list[str] = field(default_factory=list)
    # structured outputs: the constrained rows' token bitmask (None: no constrained request samples)
    grammar: Optional[GrammarBitmask] = None

    def __bool__(self) -> bool:
        return bool(self.num_scheduled_tokens)
