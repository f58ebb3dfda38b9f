"""RoBERTa and XLM-RoBERTa encoders (multilingual-e5, bge-m3) and their sequence classifiers
(bge-reranker-base / -v2-m3 are XLMRobertaForSequenceClassification).

The layers are BERT's, under `roberta.`; what differs is where positions start: RoBERTa numbers
a sequence's tokens from padding_idx + 1 (padding tokens themselves sit at padding_idx), so a
model with max_position_embeddings 514 and padding_idx 1 reads 512 tokens. One segment only
(type_vocab_size 1): a text pair is `<s> a </s></s> b </s>` with no token types.
"""
from __future__ import annotations

import torch

from pagoda.models.bert import BertModel, SequenceClassifier


def roberta_positions(input_ids: torch.Tensor, positions: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """RoBERTa's position ids of a flattened batch whose `positions` count 0.. in each input:
    padding_idx + (number of non-padding tokens up to and including this one), padding_idx for
    padding tokens (transformers' create_position_ids_from_input_ids)."""
    not_pad = input_ids != padding_idx
    if bool(not_pad.all()):
        return positions + padding_idx + 1
    count = torch.cumsum(not_pad.long(), 0)
    starts = torch.arange(len(input_ids), device=input_ids.device) - positions
    before = torch.where(starts > 0, count[(starts - 1).clamp(min=0)], torch.zeros_like(count))
    return torch.where(not_pad, count - before + padding_idx, torch.full_like(count, padding_idx))


class RobertaModel(BertModel):
    prefix = "roberta."

    def __init__(self, config):
        super().__init__(config)
        self.padding_idx = int(config.pad_token_id)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(input_ids, roberta_positions(input_ids, positions, self.padding_idx),
                               token_type_ids)


class XLMRobertaModel(RobertaModel):
    """The same architecture with a larger (SentencePiece) vocabulary."""


class RobertaForSequenceClassification(SequenceClassifier, RobertaModel):
    """`classifier.dense` -> tanh -> `classifier.out_proj` on the <s> token."""
    head_names = {"classifier.dense": "head.dense", "classifier.out_proj": "head.out"}


class XLMRobertaForSequenceClassification(RobertaForSequenceClassification):
    """bge-reranker-v2-m3 and other XLM-R cross-encoders."""
