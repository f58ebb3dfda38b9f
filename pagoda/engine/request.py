"""One request as the engine core tracks it: its tokens, how many of them the KV cache holds, its
blocks, and why it stopped. A request with n > 1 samples arrives as n requests (the front end
fans it out); the prefix cache makes them share the prompt's full KV blocks.
"""
from __future__ import annotations

import enum
import time
from typing import Optional

from pagoda.engine.messages import EngineCoreRequest, FinishReason
from pagoda.pooling_params import PoolingParams
from pagoda.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int],
                 sampling_params: Optional[SamplingParams] = None,
                 pooling_params: Optional[PoolingParams] = None, arrival_time: Optional[float] = None,
                 client_index: int = 0, token_type_ids: Optional[list[int]] = None,
                 mm_features: Optional[list] = None, encoder_features=None):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.pooling_params = pooling_params
        self.token_type_ids = token_type_ids
        # images (MultiModalFeature, by offset); their processor outputs are dropped once the
        # worker has them. encoder_refs: indices of images whose encoder output it holds
        self.mm_features = mm_features or None
        self.encoder_refs: set[int] = set()
        # encoder-decoder models (Whisper): the audio features, dropped once sent to the worker;
        # the encoder's positions count against the token budget of the step that admits it
        self.encoder_features = encoder_features
        self.has_encoder_input = encoder_features is not None
        self.num_encoder_tokens = encoder_features.shape[-1] // 2 if encoder_features is not None else 0
        self.arrival_time = arrival_time or time.time()
        self.client_index = client_index
        self.num_prompt_tokens = len(prompt_token_ids)
        self.all_token_ids: list[int] = list(prompt_token_ids)  # prompt + resolved outputs
        self.num_computed_tokens = 0
        # Overlapped steps: tokens sampled on the device whose values the engine has not read
        # back yet. They count toward num_tokens (the worker feeds them from its own device
        # tensor); their values arrive one step later.
        self.num_pending = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []   # chained hashes of this request's full blocks
        self.status = RequestStatus.WAITING
        self.finish_reason: Optional[FinishReason] = None
        self.stop_reason: Optional[int | str] = None
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        self.first_scheduled_time: Optional[float] = None
        self.reported_scheduled = False
        p = sampling_params
        self.needs_prompt_logprobs = p is not None and p.prompt_logprobs is not None
        # sampling that reads no token history on the host and returns no logprobs: such a
        # request can be sampled while the host already prepares the next step
        self.overlappable = p is None or (p.logprobs is None and p.repetition_penalty == 1.0
                                          and not p.presence_penalty and not p.frequency_penalty
                                          and not self.needs_prompt_logprobs)

    @classmethod
    def from_engine_core_request(cls, r: EngineCoreRequest) -> "Request":
        return cls(r.request_id, r.prompt_token_ids, r.sampling_params, r.pooling_params,
                   r.arrival_time, r.client_index, r.token_type_ids, r.mm_features,
                   r.encoder_features.numpy() if r.encoder_features is not None else None)

    @property
    def is_pooling(self) -> bool:
        return self.pooling_params is not None

    @property
    def num_tokens(self) -> int:
        """Prompt + outputs, including outputs still in flight."""
        return len(self.all_token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def __repr__(self):
        return (f"Request({self.request_id}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens})")
