"""What the engine hands back: RequestOutput with one CompletionOutput per sample (vLLM shape)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# one dict per position: token id -> Logprob (the chosen token plus the top-k alternatives)
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class RequestMetrics:
    """Timestamps (time.time()) and counts for one request; the server turns them into metrics."""
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[SampleLogprobs] = None
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | None while running
    stop_reason: Optional[int | str] = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None
    metrics: Optional[RequestMetrics] = None
    num_cached_tokens: int = 0
    # streaming: text/token deltas since the previous output of this request, per sample index
    delta_text: dict[int, str] = field(default_factory=dict)
    delta_token_ids: dict[int, list[int]] = field(default_factory=dict)
    delta_logprobs: dict[int, SampleLogprobs] = field(default_factory=dict)


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """One input's embedding, shaped like vLLM's (``out.outputs.embedding``)."""
    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass
class PoolingOutput:
    data: Any  # numpy array: the pooled vector (embedding) of one input


@dataclass
class PoolingRequestOutput:
    """A pooling request's result (vLLM's shape: ``out.outputs.data``)."""
    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    finished: bool = True
    metrics: Optional[RequestMetrics] = None


@dataclass
class ClassificationOutput:
    probs: list[float]  # one per class (softmax; the sigmoid of a one-label head)

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ClassificationRequestOutput:
    """One input's class probabilities, shaped like vLLM's (``out.outputs.probs``)."""
    request_id: str
    outputs: ClassificationOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass
class ScoringOutput:
    score: float  # cross-encoder: the sigmoid of its logit; bi-encoder: the cosine similarity


@dataclass
class ScoringRequestOutput:
    """One text pair's score, shaped like vLLM's (``out.outputs.score``); prompt_token_ids are
    the pair's tokens (a cross-encoder's one input, or both inputs of a bi-encoder)."""
    request_id: str
    outputs: ScoringOutput
    prompt_token_ids: list[int]
    finished: bool = True
