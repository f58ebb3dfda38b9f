"""Attention layers: causal over the paged KV cache (decoders), and non-causal over each
sequence's own tokens (encoders: BERT, vision towers).

The per-step metadata (one flattened batch) is set once by the model runner with
`set_attention_metadata` and read by every layer, so model code never threads it through.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from pagoda.kernels.kv_quant import KVQuant
from pagoda.platforms import current_platform


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor        # int64 [num_tokens]
    query_start_loc: torch.Tensor     # int32 [num_reqs + 1]
    seq_lens: torch.Tensor            # int32 [num_reqs]
    block_tables: torch.Tensor        # int32 [num_reqs, max_blocks]
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: Optional[list[int]] = None
    seq_lens_cpu: Optional[list[int]] = None
    # values every layer derives alike from this step's metadata, computed by the first layer
    cache: dict = field(default_factory=dict)


_META: Optional[AttentionMetadata] = None


def set_attention_metadata(meta: Optional[AttentionMetadata]) -> None:
    global _META
    _META = meta


def get_attention_metadata() -> AttentionMetadata:
    assert _META is not None, "attention called outside a model-runner step"
    return _META


class Attention(nn.Module):
    """Writes this step's K/V into the layer's cache by slot mapping, then attends through the
    block tables. `kv_cache` (and `kv_quant`, the format of a quantized cache) are bound by the
    model runner after the cache is allocated.
    sliding_window: this layer's window (a query at p sees keys in (p - window, p]); None = global.
    logits_soft_cap: cap * tanh(score / cap) on the scaled scores; None = off."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: Optional[int] = None, logits_soft_cap: Optional[float] = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        self.kv_cache: torch.Tensor = torch.empty(0)
        self.kv_quant: Optional[KVQuant] = None
        self.ops = current_platform().ops

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = get_attention_metadata()
        ops = self.ops
        kvq = self.kv_quant
        ops.reshape_and_cache(k, v, self.kv_cache, m.slot_mapping, kvq)
        if ops.triton:
            return ops.paged_attention(q, self.kv_cache, m.query_start_loc, m.seq_lens, m.block_tables,
                                       self.scale, max_query_len=m.max_query_len,
                                       max_seq_len=m.max_seq_len, sliding_window=self.sliding_window,
                                       logits_soft_cap=self.logits_soft_cap, kv_quant=kvq)
        return ops.paged_attention(q, self.kv_cache, m.query_start_loc, m.seq_lens, m.block_tables,
                                   self.scale, m.query_start_loc_cpu, m.seq_lens_cpu, step_cache=m.cache,
                                   sliding_window=self.sliding_window,
                                   logits_soft_cap=self.logits_soft_cap, kv_quant=kvq)


class EncoderAttention(nn.Module):
    """Bidirectional attention within each sequence of a flattened batch (no KV cache): every
    token sees every token of its own sequence and none of the others'. The sequences' bounds
    come from the step's metadata (query_start_loc)."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: Optional[int] = None):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.num_kv_heads = num_kv_heads or num_heads
        self.ops = current_platform().ops

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = get_attention_metadata()
        return self.ops.varlen_attention(q, k, v, m.query_start_loc, self.scale, m.query_start_loc_cpu,
                                         step_cache=m.cache)
