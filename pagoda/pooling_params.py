"""PoolingParams: how one pooling request (embedding, and later classify / score) is answered.
Names follow vLLM. A request carries either SamplingParams (generate) or PoolingParams."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

TASKS = ("embed", "encode")


@dataclass
class PoolingParams:
    task: str = "embed"
    normalize: Optional[bool] = None    # None: the model's own default (sentence-transformers files)
    dimensions: Optional[int] = None    # only the model's size is accepted for now

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}.")
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or
                                            not isinstance(self.dimensions, int) or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive integer, got {self.dimensions!r}.")

    def clone(self, **changes) -> "PoolingParams":
        return replace(self, **changes)
