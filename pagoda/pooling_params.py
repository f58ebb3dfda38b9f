"""PoolingParams: how one pooling request is answered. Names follow vLLM. A request carries either
SamplingParams (generate) or PoolingParams.

Tasks: ``embed`` (the pooled hidden state, L2-normalized by default, optionally truncated to
``dimensions`` for Matryoshka models), ``classify`` (class probabilities: softmax over the labels,
sigmoid for a one-label head), ``score`` (a cross-encoder's relevance of a text pair: the sigmoid
of its one logit) and ``encode`` (the pooler's raw output: an embedding model's pooled vector,
or a classifier's logits). Which tasks a model serves is checked by the engine's front end.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

TASKS = ("embed", "classify", "score", "encode")


@dataclass
class PoolingParams:
    task: str = "embed"
    normalize: Optional[bool] = None    # embed/encode; None: the model's default (sentence-transformers files)
    dimensions: Optional[int] = None    # embed: keep the first `dimensions` values (Matryoshka models)
    activation: Optional[bool] = None   # classify/score: softmax / sigmoid; None: on (off for encode)
    # -1: the model's max_model_len; k >= 1: keep the last k prompt tokens; None: no truncation
    truncate_prompt_tokens: Optional[int] = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}.")
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or
                                            not isinstance(self.dimensions, int) or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive integer, got {self.dimensions!r}.")
        t = self.truncate_prompt_tokens
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or (t < 1 and t != -1)):
            raise ValueError(f"truncate_prompt_tokens must be -1 or a positive integer, got {t!r}.")
        for name in ("normalize", "activation"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"{name} must be a boolean, got {v!r}.")

    @property
    def use_activation(self) -> bool:
        return self.activation if self.activation is not None else self.task != "encode"

    def clone(self, **changes) -> "PoolingParams":
        return replace(self, **changes)
