"""SamplingParams: how one request is decoded. Names and meanings follow vLLM."""
from __future__ import annotations

import json as _json
from dataclasses import dataclass, field
from typing import Optional, Union

from pagoda.beam_search import BeamSearchParams  # noqa: F401  (vLLM's import path)

# The engine keeps counts and token ids in int32/int64 tensors and seeds in torch generators:
# values outside these ranges are refused here, before any engine step could overflow on them.
INT32_MAX = (1 << 31) - 1
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)


def _check_int(name: str, v, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an integer, got {v!r}.")
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}.")


# the kinds of constraint a StructuredOutputsParams may carry (exactly one is set)
STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """Constrain a request's output (vLLM's `StructuredOutputsParams`): exactly one of `json` (a
    JSON schema, dict or string), `regex`, `choice` (one of these strings), `grammar` (EBNF, or
    Lark when it has a `start` rule), `json_object` (any JSON object) or `structural_tag`
    (xgrammar's structural-tag JSON). Plain data: it crosses to the engine core with the request,
    which compiles it (pagoda.structured_output) and masks the logits every step."""
    json: Optional[Union[str, dict]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    structural_tag: Optional[str] = None
    # JSON only: no whitespace between tokens / a regex every whitespace run must match
    disable_any_whitespace: bool = False
    whitespace_pattern: Optional[str] = None

    def __post_init__(self):
        if self.json_object is False:
            self.json_object = None
        given = [k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"structured_outputs: exactly one of {', '.join(STRUCTURED_OUTPUT_KINDS)} "
                             f"must be set, got {', '.join(given) if given else 'none'}.")
        if self.choice is not None:
            if isinstance(self.choice, str) or not self.choice or not all(
                    isinstance(c, str) for c in self.choice):
                raise ValueError("choice: must be a non-empty list of strings.")
            self.choice = list(self.choice)
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError("json: must be a JSON schema (an object or its JSON text).")

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) is not None)

    @property
    def spec(self) -> str:
        """The constraint as text (a JSON schema serialized, choices as a JSON list)."""
        v = getattr(self, self.kind)
        if self.kind in ("json", "choice") and not isinstance(v, str):
            return _json.dumps(v, ensure_ascii=False)
        return "" if v is True else v

    def key(self) -> tuple:
        """What the compiled grammar depends on: the cache key of compilations."""
        return (self.kind, self.spec, self.disable_any_whitespace, self.whitespace_pattern)


GuidedDecodingParams = StructuredOutputsParams  # vLLM's older name


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    logit_bias: Optional[dict[int, float]] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    structured_outputs: Optional[StructuredOutputsParams] = None
    # vLLM's: only these token ids may be sampled; these words are never generated (each is
    # tokenized by the front end into bad_words_token_ids, with and without a leading space)
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    guided_decoding: Optional[StructuredOutputsParams] = field(default=None, repr=False)  # vLLM's old name
    # filled in by the engine (generation_config.json / tokenizer)
    eos_token_ids: tuple[int, ...] = field(default=(), repr=False)
    # Whisper (generation_config.json's begin_suppress_tokens): never the first output token
    begin_suppress_token_ids: tuple[int, ...] = field(default=(), repr=False)
    # filled in by the front end (InputProcessor): the token sequences of the bad words
    bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if self.bad_words is not None:
            self.bad_words = list(self.bad_words)
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError("structured_outputs: give structured_outputs or guided_decoding, not both.")
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self.validate()

    def validate(self):
        def bad(name, msg):
            raise ValueError(f"{name} {msg}")
        if not isinstance(self.n, int) or self.n < 1:
            bad("n", f"must be at least 1, got {self.n}.")
        _check_int("n", self.n, 1, 4096)
        _check_int("top_k", self.top_k, -1, INT32_MAX)
        _check_int("min_tokens", self.min_tokens, 0, INT32_MAX)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, INT32_MAX)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0, INT32_MAX)
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, 0, INT32_MAX)
        for t in (self.logit_bias or {}):
            _check_int("logit_bias", t, 0, INT32_MAX)
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                bad("allowed_token_ids", "must not be empty (leave it out to allow every token).")
            for t in self.allowed_token_ids:
                _check_int("allowed_token_ids", t, 0, INT32_MAX)
        if self.bad_words is not None and any(not isinstance(w, str) or not w.strip()
                                              for w in self.bad_words):
            bad("bad_words", "must be a list of non-empty strings.")
        if self.seed is not None:
            _check_int("seed", self.seed, *SEED_RANGE)
        if self.temperature < 0:
            bad("temperature", f"must be non-negative, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            bad("top_k", f"must be -1 (off), 0 (off) or at least 1, got {self.top_k}.")
        if not 0 <= self.min_p <= 1:
            bad("min_p", f"must be in [0, 1], got {self.min_p}.")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}.")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}.")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", f"must be greater than zero, got {self.repetition_penalty}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", f"must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            bad("min_tokens", f"must be non-negative, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be less than or equal to max_tokens={self.max_tokens}, got "
                f"{self.min_tokens}.")
        if self.logprobs is not None and self.logprobs < 0:
            bad("logprobs", f"must be non-negative, got {self.logprobs}.")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            bad("prompt_logprobs", f"must be non-negative, got {self.prompt_logprobs}.")
        if any(not s for s in self.stop):
            bad("stop", "must not contain empty strings.")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    def for_sample(self, index: int) -> "SamplingParams":
        """The params of sample `index` of an n > 1 request (which runs as n requests of n=1):
        each gets its own seed stream, reproducible and independent of the batch; the prompt's
        logprobs are computed once, by sample 0."""
        seed = self.seed
        if seed is not None and index:
            seed = hash((seed, index)) & 0x7FFFFFFFFFFF
        return self.clone(n=1, seed=seed, prompt_logprobs=self.prompt_logprobs if index == 0 else None)

    def clone(self, **changes) -> "SamplingParams":
        from dataclasses import replace
        return replace(self, **changes)
