"""Scoring text pairs, shared by `LLM.score` and the /score and /rerank endpoints.

vLLM's pairing: one text_1 against one or many text_2 (1 -> 1, 1 -> N), or two lists of equal
length paired in order (N -> N). A cross-encoder reads each pair as one input; a bi-encoder
(an embedding model) embeds each distinct text once and scores a pair by the cosine of the two.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

Texts = Union[str, Sequence[str]]


def _texts(value: Texts, field: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"{field}: must be a non-empty string or a non-empty list of strings")
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise ValueError(f"{field}: item {i} is not a string")
        if not t:
            raise ValueError(f"{field}: item {i} is empty")
    return list(items)


def score_pairs(text_1: Texts, text_2: Texts, names: tuple[str, str] = ("text_1", "text_2")
                ) -> list[tuple[str, str]]:
    """The (text_1, text_2) pairs to score, in output order; ValueError naming the field."""
    a, b = _texts(text_1, names[0]), _texts(text_2, names[1])
    if len(a) == 1:
        a = a * len(b)
    elif len(a) != len(b):
        raise ValueError(f"{names[1]}: {len(b)} texts for {len(a)} in {names[0]}; give one {names[0]} "
                         f"(scored against each {names[1]}) or as many as {names[1]}")
    return list(zip(a, b))


def distinct(pairs: list[tuple[str, str]]) -> list[str]:
    """Each text of the pairs once, in first-seen order (what a bi-encoder embeds)."""
    return list(dict.fromkeys(t for pair in pairs for t in pair))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
