"""Decoders as pooling models: the same layers on the same paged KV cache, no LM head.

A causal decoder's last prompt token has seen the whole prompt, so its final hidden state is the
prompt's summary: Qwen3-Embedding returns it (normalized) as the embedding, and
...ForSequenceClassification checkpoints put a linear `score` head (no bias) on it — the HF
classes pick the last non-padding token, which for an unpadded prompt is the last token. Because
the runner needs that one row only, prefix caching and chunked prefill apply as for generation.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class _DecoderEmbedding:
    """Mixin over a ...ForCausalLM class: hidden states out, the LM head (and any classifier
    head of the checkpoint) left unloaded."""
    has_lm_head = False
    _skipped = ("score.",)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights((n, t) for n, t in weights if not n.startswith(self._skipped))


class _DecoderClassifier:
    """Mixin over a ...ForCausalLM class: `score` [num_labels, hidden] on the pooled last token."""
    has_lm_head = False

    def __init__(self, config, max_position: int | None = None):
        super().__init__(config, max_position)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.score(pooled)


def _derive(mixin, cls, suffix: str):
    name = cls.__name__.removesuffix("ForCausalLM") + suffix
    return type(name, (mixin, cls), {"__doc__": f"{cls.__name__} as a pooling model ({suffix})."})


def as_embedding_model(cls):
    return _derive(_DecoderEmbedding, cls, "EmbeddingModel")


def as_classification_model(cls):
    return _derive(_DecoderClassifier, cls, "ForSequenceClassification")
