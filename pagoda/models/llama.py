"""Llama family decoder (Llama 2/3, SmolLM2, Mistral); Qwen2 and Qwen3 subclass it, Gemma 3
reuses its attention and loading.

Per layer: RMSNorm -> merged qkv projection -> (Qwen3: per-head q/k RMSNorm) -> rotary ->
paged attention (global, or a sliding window where the config gives one) -> o_proj -> fused
add+RMSNorm -> merged gate|up -> SiLU*up -> down_proj.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pagoda.layers.activation import SiluAndMul
from pagoda.layers.attention import Attention
from pagoda.layers.embedding import LMHead, VocabEmbedding
from pagoda.distributed.parallel_state import tp_size
from pagoda.layers.linear import ColumnParallelLinear, RowParallelLinear
from pagoda.layers.norm import RMSNorm
from pagoda.layers.rotary import RotaryEmbedding, rope_parameters
from pagoda.models.weights import expected_names, load_named


def layer_sliding_window(config, layer_idx: int) -> int | None:
    """The attention window of layer `layer_idx` as transformers applies it: configs with
    `layer_types` (Gemma 3, Qwen2/3 with use_sliding_window) name each layer's kind; otherwise
    (Mistral) `sliding_window` applies to every layer. None: global attention."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None and types[layer_idx] != "sliding_attention":
        return None
    return int(window) if window else None


class LlamaAttention(nn.Module):
    qk_norm = False
    norm_cls = RMSNorm

    def __init__(self, config, rotary: RotaryEmbedding, layer_idx: int = 0):
        super().__init__()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        # tensor parallelism: each rank has heads / ranks query heads and its KV heads (a KV head
        # is replicated on several ranks when there are fewer KV heads than ranks)
        n = tp_size()
        if heads % n or (kv_heads % n and n % kv_heads):
            raise ValueError(f"--tensor-parallel-size: {n} ranks cannot split {heads} attention "
                             f"heads and {kv_heads} KV heads evenly")
        kv_parts = min(n, kv_heads)
        self.num_heads, self.num_kv_heads = heads // n, kv_heads // kv_parts
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = self.qkv_bias(config)
        full_q, full_kv = heads * self.head_dim, kv_heads * self.head_dim
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, full_q + 2 * full_kv, bias=bias,
                                             shard_sizes=[full_q, full_kv, full_kv],
                                             shard_parts=[n, kv_parts, kv_parts])
        self.o_proj = RowParallelLinear(full_q, config.hidden_size, bias=self.o_bias(config))
        if self.qk_norm:
            self.q_norm = self.norm_cls(self.head_dim, config.rms_norm_eps)
            self.k_norm = self.norm_cls(self.head_dim, config.rms_norm_eps)
        self.rotary = rotary  # one table shared by all layers (of a kind)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.attn_scale(config),
                              layer_sliding_window(config, layer_idx), self.soft_cap(config))

    def attn_scale(self, config) -> float:
        return self.head_dim ** -0.5

    def soft_cap(self, config) -> float | None:
        return None

    def qkv_bias(self, config) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def o_bias(self, config) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def forward(self, positions: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(h)
        T = qkv.shape[0]
        q = qkv[:, :self.q_size].view(T, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size:self.q_size + self.kv_size].view(T, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        o = self.attn(q, k, v)
        return self.o_proj(o.reshape(T, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inter = config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, 2 * inter, bias=bias,
                                                 shard_sizes=[inter, inter])
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias)
        self.act = SiluAndMul()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(h)))


def add_and_norm(norm: RMSNorm, h: torch.Tensor, residual: torch.Tensor | None):
    """A layer's input norm: (norm(h + residual), h + residual), where the first layer (no
    residual yet) starts the residual stream with h."""
    if residual is None:
        return norm(h), h
    return norm(h, residual)


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, config, rotary: RotaryEmbedding, layer_idx: int = 0):
        super().__init__()
        self.self_attn = self.attention_cls(config, rotary, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, h, residual):
        h, residual = add_and_norm(self.input_layernorm, h, residual)
        h = self.self_attn(positions, h)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    layer_cls = LlamaDecoderLayer
    norm_cls = RMSNorm
    has_lm_head = True  # False: a pooling model (models/adapters.py) reads hidden states only
    # checkpoint name fragment -> (our module fragment, shard index) for merged projections
    packed = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config, max_position: int | None = None):
        super().__init__()
        self.config = config
        max_position = max_position or config.max_position_embeddings
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        rotaries = self.rotary_embeddings(config, max_position)
        self.layers = nn.ModuleList(self.layer_cls(config, rotaries[i], i)
                                    for i in range(config.num_hidden_layers))
        self.norm = self.norm_cls(config.hidden_size, config.rms_norm_eps)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = (LMHead(config.vocab_size, config.hidden_size, self.embed_tokens if tied else None)
                        if self.has_lm_head else None)

    def rotary_embeddings(self, config, max_position: int) -> list[RotaryEmbedding]:
        """The rotary table of each layer (here one, shared by all)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rot_dim = int(head_dim * float(getattr(config, "partial_rotary_factor", 1.0)))
        rotary = RotaryEmbedding(head_dim, max_position, rope_parameters(config), rot_dim)
        return [rotary] * config.num_hidden_layers

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """inputs_embeds: the step's token embeddings when a vision-language model has put image
        embeddings in them (input_ids are then not read)."""
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.layers:
            h, residual = layer(positions, h, residual)
        h, _ = self.norm(h, residual)
        return h

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named tensors; returns the names of our parameters that were filled."""
        def ours():
            for name, tensor in weights:
                if "rotary_emb.inv_freq" in name:
                    continue
                name = name.removeprefix("model.")
                if name.startswith("lm_head.") and (self.lm_head is None or self.lm_head.tied):
                    continue  # tied: the embedding is the head (or no head: a pooling model)
                yield name, tensor
        return load_named(self, ours(), self.packed)

    def expected_weights(self) -> set[str]:
        names = expected_names(self)
        if self.lm_head is not None and self.lm_head.tied:
            names.discard("lm_head.weight")
        return names


class MistralForCausalLM(LlamaForCausalLM):
    """Same layout as Llama; every layer attends within the config's `sliding_window` (4096 on
    Mistral-7B-v0.1; null, i.e. global, from v0.2 on)."""
