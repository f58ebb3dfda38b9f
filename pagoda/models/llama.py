"""Llama family decoder (Llama 2/3, SmolLM2, Mistral); Qwen2 and Qwen3 subclass it.

Per layer: RMSNorm -> merged qkv projection -> (Qwen3: per-head q/k RMSNorm) -> rotary ->
paged attention -> o_proj -> fused add+RMSNorm -> merged gate|up -> SiLU*up -> down_proj.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pagoda.layers.activation import SiluAndMul
from pagoda.layers.attention import Attention
from pagoda.layers.embedding import LMHead, VocabEmbedding
from pagoda.layers.linear import Linear
from pagoda.layers.norm import RMSNorm
from pagoda.layers.rotary import RotaryEmbedding, rope_parameters


class LlamaAttention(nn.Module):
    qk_norm = False

    def __init__(self, config, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = self.qkv_bias(config)
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=bias,
                               shard_sizes=[self.q_size, self.kv_size, self.kv_size])
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=self.o_bias(config))
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary = rotary  # one table shared by all layers
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)

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
        self.gate_up_proj = Linear(config.hidden_size, 2 * inter, bias=bias, shard_sizes=[inter, inter])
        self.down_proj = Linear(inter, config.hidden_size, bias=bias)
        self.act = SiluAndMul()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(h)))


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, config, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = self.attention_cls(config, rotary)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, h, residual):
        if residual is None:
            residual = h
            h = self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, h)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    layer_cls = LlamaDecoderLayer
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
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rot_dim = int(head_dim * float(getattr(config, "partial_rotary_factor", 1.0)))
        rotary = RotaryEmbedding(head_dim, max_position, rope_parameters(config), rot_dim)
        self.layers = nn.ModuleList(self.layer_cls(config, rotary)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, self.embed_tokens if tied else None)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            h, residual = layer(positions, h, residual)
        h, _ = self.norm(h, residual)
        return h

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named tensors; returns the names of our parameters that were filled."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            name = name.removeprefix("model.")
            if name.startswith("lm_head.") and self.lm_head.tied:
                continue  # tied: the embedding is the head
            for frag, (merged, shard) in self.packed.items():
                if f".{frag}." in name:
                    mod_name, pname = name.replace(f".{frag}.", f".{merged}.").rsplit(".", 1)
                    self.get_submodule(mod_name).load_shard(shard, pname, tensor)
                    loaded.add(f"{mod_name}.{pname}#{shard}")
                    break
            else:
                if name not in params:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
                p = params[name]
                if p.shape != tensor.shape:
                    raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)} vs "
                                     f"model {tuple(p.shape)}")
                p.data.copy_(tensor)
                if getattr(tensor, "gguf", None) is not None:  # packed blocks, for layers that keep them
                    p.gguf = tensor.gguf
                loaded.add(name)
        return loaded

    def expected_weights(self) -> set[str]:
        names = set()
        for mname, mod in self.named_modules():
            if isinstance(mod, Linear):
                for pname in ("weight", "bias"):
                    if getattr(mod, pname) is None:
                        continue
                    if len(mod.shard_sizes) > 1:
                        names |= {f"{mname}.{pname}#{i}" for i in range(len(mod.shard_sizes))}
                    else:
                        names.add(f"{mname}.{pname}")
        for n, _ in self.named_parameters():
            if not any(n.startswith(m + ".") for m, mod in self.named_modules() if isinstance(mod, Linear)):
                names.add(n)
        if self.lm_head.tied:
            names.discard("lm_head.weight")
        return names


class MistralForCausalLM(LlamaForCausalLM):
    """Same layout as Llama. Sliding-window attention is not applied (full attention); exact for
    prompts shorter than the window (4096 on Mistral-7B-v0.1, none on later versions)."""
