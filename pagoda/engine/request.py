"""One request's state. A request with n > 1 samples fans out into n `Sequence`s sharing a
`Request` parent; the prefix cache makes them share the prompt's full KV blocks."""
from __future__ import annotations

import enum
import time
from typing import Optional

import torch

from pagoda.outputs import Logprob, RequestMetrics, SampleLogprobs
from pagoda.sampling_params import SamplingParams


PENDING = -1  # placeholder token id: sampled on the device, not read back yet


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class Sequence:
    def __init__(self, seq_id: str, request: "Request", index: int, params: SamplingParams):
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.params = params
        self.prompt_len = len(request.prompt_token_ids)
        self.token_ids: list[int] = list(request.prompt_token_ids)  # prompt + output
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of this sequence's full blocks
        self.status = SequenceStatus.WAITING
        self.finish_reason: Optional[str] = None
        self.stop_reason: Optional[int | str] = None
        self.logprobs: Optional[SampleLogprobs] = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.generator: Optional[torch.Generator] = None
        if params.seed is not None:
            # each sample of an n>1 request gets its own stream, still reproducible from the seed
            seed = params.seed if index == 0 else hash((params.seed, index)) & 0x7FFFFFFFFFFF
            self.generator = torch.Generator().manual_seed(seed)
        self.detok = None  # set by the engine (engine.detokenizer.IncrementalDetokenizer)
        self.num_preemptions = 0
        # Overlapped steps: a token sampled on the device but not yet read back sits at the end of
        # token_ids as PENDING until the engine resolves it one step later; sample_row is its row
        # in that step's sampled-ids tensor, which the next step reads its input id from.
        self.num_pending = 0
        self.needs_prompt_logprobs = request.params.prompt_logprobs is not None and index == 0
        self.sample_row = -1
        # sampling that needs no token history and no host readback of logprobs: such a batch can
        # be sampled on the device while the host goes on (see LLMEngine.step)
        self.overlappable = (params.logprobs is None and params.repetition_penalty == 1.0
                             and not params.presence_penalty and not params.frequency_penalty)
        self.plain_greedy = (self.overlappable and params.greedy and not params.logit_bias
                             and not params.min_tokens)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def drop_pending(self) -> None:
        """Forget tokens still in flight (the sequence finished or was aborted before them)."""
        if self.num_pending:
            del self.token_ids[len(self.token_ids) - self.num_pending:]
            self.num_pending = 0

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED


    def __repr__(self):
        return f"Sequence({self.seq_id}, {self.status.value}, tokens={self.num_tokens}, computed={self.num_computed_tokens})"


class Request:
    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                 params: SamplingParams, arrival_time: Optional[float] = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.metrics = RequestMetrics(arrival_time=arrival_time or time.time(),
                                      num_prompt_tokens=len(prompt_token_ids))
        self.prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = (
            [None] if params.prompt_logprobs is not None else None)
        self.seqs = [Sequence(request_id if params.n == 1 else f"{request_id}#{i}", self, i, params)
                     for i in range(params.n)]
        # streaming bookkeeping: what each sample has already reported
        self.sent_text_len = [0] * params.n
        self.sent_tokens = [0] * params.n
        self.sent_logprobs = [0] * params.n

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
