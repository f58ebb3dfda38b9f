"""Attention layers: causal over the paged KV cache (decoders), non-causal over each
sequence's own tokens (encoders: BERT, vision towers), and cross-attention from a decoder's
tokens to its request's encoder output (Whisper).

The per-step metadata (one flattened batch) is set once by the model runner with
`set_attention_metadata` and read by every layer, so model code never threads it through.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from pagoda.kernels.kv_quant import KVQuant, calibrate
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
    # encoder-decoder models: each request's row in the cross-attention K/V store (int64 [num_reqs])
    cross_rows: Optional[torch.Tensor] = None
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
    logits_soft_cap: cap * tanh(score / cap) on the scaled scores; None = off.
    calculate_kv_scales (--calculate-kv-scales, set by the model runner on an fp8 cache): the
    next forward outside CUDA-graph capture sets the cache's K and V scales from its own K/V
    before writing them. An int4 cache rotates q, k, v over head_dim (kv_quant.hadamard) before
    its write and attention, and the output back after."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: Optional[int] = None, logits_soft_cap: Optional[float] = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        self.kv_cache: torch.Tensor = torch.empty(0)
        self.kv_quant: Optional[KVQuant] = None
        self.calculate_kv_scales = False
        self.ops = current_platform().ops

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = get_attention_metadata()
        ops = self.ops
        kvq = self.kv_quant
        if self.calculate_kv_scales and kvq is not None and kvq.fp8_scales is not None and not (
                k.is_cuda and torch.cuda.is_current_stream_capturing()):
            calibrate(kvq, k, v)
            self.calculate_kv_scales = False
        rot = kvq.rotation if kvq is not None else None
        if rot is not None:
            q, k, v = q @ rot, k @ rot, v @ rot
        ops.reshape_and_cache(k, v, self.kv_cache, m.slot_mapping, kvq)
        if ops.triton:
            out = ops.paged_attention(q, self.kv_cache, m.query_start_loc, m.seq_lens, m.block_tables,
                                      self.scale, max_query_len=m.max_query_len,
                                      max_seq_len=m.max_seq_len, sliding_window=self.sliding_window,
                                      logits_soft_cap=self.logits_soft_cap, kv_quant=kvq)
        else:
            out = ops.paged_attention(q, self.kv_cache, m.query_start_loc, m.seq_lens, m.block_tables,
                                      self.scale, m.query_start_loc_cpu, m.seq_lens_cpu,
                                      step_cache=m.cache, sliding_window=self.sliding_window,
                                      logits_soft_cap=self.logits_soft_cap, kv_quant=kvq)
        return out if rot is None else out @ rot.T


@dataclass
class EncoderMetadata:
    """Sequence bounds for EncoderAttention outside a model-runner step (vision towers: one
    sequence per image, or per attention window); `cache` memoizes what every layer derives
    alike from the bounds."""
    cu_seqlens: torch.Tensor          # int32 [num_seqs + 1]
    cu_seqlens_cpu: list[int]
    cache: dict = field(default_factory=dict)

    @classmethod
    def of(cls, cu: list[int], device) -> "EncoderMetadata":
        return cls(to_device_async(torch.tensor(cu, dtype=torch.int32), device), list(cu))


def to_device_async(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on the device without waiting for the device's queued work (a copy from
    pageable memory runs in stream order: an overlapped step would wait for the one before)."""
    if torch.device(device).type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class EncoderAttention(nn.Module):
    """Bidirectional attention within each sequence of a flattened batch (no KV cache): every
    token sees every token of its own sequence and none of the others'. The sequences' bounds
    come from `meta` when given (EncoderMetadata), else from the step's metadata
    (query_start_loc)."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: Optional[int] = None):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.num_kv_heads = num_kv_heads or num_heads
        self.ops = current_platform().ops

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: Optional[EncoderMetadata] = None) -> torch.Tensor:
        if meta is not None:
            return self.ops.varlen_attention(q, k, v, meta.cu_seqlens, self.scale, meta.cu_seqlens_cpu,
                                             step_cache=meta.cache)
        m = get_attention_metadata()
        return self.ops.varlen_attention(q, k, v, m.query_start_loc, self.scale, m.query_start_loc_cpu,
                                         step_cache=m.cache)


class CrossAttention(nn.Module):
    """Each query token attends to every position of its own request's encoder output. The K/V
    were computed once per request (`cross_kv`, [2, rows, positions, heads, head_dim], bound by
    the model runner); the step's metadata names each request's row (`cross_rows`). Queries are
    laid out per request (padded to the step's longest) so one batched attention serves a
    mixed step; a decode step (one token each) needs no padding."""

    def __init__(self, num_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.cross_kv: torch.Tensor = torch.empty(0)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        m = get_attention_metadata()
        k = self.cross_kv[0, m.cross_rows].transpose(1, 2)  # [B, heads, S, head_dim]
        v = self.cross_kv[1, m.cross_rows].transpose(1, 2)
        if m.max_query_len == 1:
            o = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=self.scale)
            return o.squeeze(2)
        idx = m.cache.get("cross_pad")
        if idx is None:  # (request, offset) of each token: the same for every layer of the step
            qsl = m.query_start_loc_cpu
            req = torch.repeat_interleave(torch.arange(len(qsl) - 1),
                                          torch.tensor([b - a for a, b in zip(qsl, qsl[1:])]))
            off = torch.arange(q.shape[0]) - torch.tensor(qsl[:-1])[req]
            idx = m.cache["cross_pad"] = (req.to(q.device), off.to(q.device))
        req, off = idx
        padded = q.new_zeros(len(m.query_start_loc_cpu) - 1, m.max_query_len, self.num_heads, self.head_dim)
        padded[req, off] = q
        o = torch.nn.functional.scaled_dot_product_attention(padded.transpose(1, 2), k, v, scale=self.scale)
        return o.transpose(1, 2)[req, off]
