"""Gemma 3 text decoder (Gemma3ForCausalLM, and the language model of
Gemma3ForConditionalGeneration loaded text-only).

Llama's attention and weight loading with these differences:
- layers follow `config.layer_types`: "sliding_attention" layers attend within `sliding_window`
  and rotate with the local base (rope_local_base_freq), "full_attention" layers are global and
  rotate with rope_theta plus the config's rope scaling;
- per-head q/k RMSNorm; four norms per layer (before and after attention, before and after the
  MLP), every one multiplying by (1 + weight);
- embeddings scaled by sqrt(hidden_size), rounded to the model dtype as transformers does;
- attention scale query_pre_attn_scalar ** -0.5, optional final-logit soft cap (the attention
  soft cap field is ignored, as transformers ignores it for Gemma 3);
- GELU (tanh approximation) gated MLP; tied embeddings.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pagoda.layers.activation import GeluAndMul
from pagoda.layers.norm import RMSNorm
from pagoda.layers.rotary import RotaryEmbedding
from pagoda.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, add_and_norm

# checkpoint prefixes of Gemma3ForConditionalGeneration: transformers 5 and 4.x layouts
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
_VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.",
                    "multi_modal_projector.")
_GELU = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}


class GemmaRMSNorm(RMSNorm):
    """RMSNorm scaled by (1 + weight): checkpoints hold the zero-centred weight. The multiplier
    is formed once in float32 (as transformers forms it for every call) after loading, so the
    plain RMSNorm kernels run unchanged and a bf16 model does not round it to bf16."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps)
        self.weight.data.zero_()
        self.register_buffer("multiplier", torch.empty(0), persistent=False)

    def refresh(self) -> None:
        self.multiplier = 1.0 + self.weight.detach().float()

    def scale(self) -> torch.Tensor:
        if self.multiplier.numel() == 0:  # weights set without load_weights (dummy load)
            self.refresh()
        return self.multiplier


class Gemma3Attention(LlamaAttention):
    qk_norm = True
    norm_cls = GemmaRMSNorm

    def attn_scale(self, config) -> float:
        return float(config.query_pre_attn_scalar) ** -0.5

    def soft_cap(self, config) -> float | None:
        # Gemma 3 dropped Gemma 2's attention soft cap: transformers' Gemma 3 attention never
        # applies attn_logit_softcapping (the config keeps the field) and llama.cpp's converter
        # asserts it is unset; so it is ignored here too
        return None


class Gemma3MLP(LlamaMLP):
    def __init__(self, config):
        super().__init__(config)
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
        if act not in _GELU:
            raise ValueError(f"Gemma 3 hidden_activation {act!r} is not supported "
                             f"(supported: {', '.join(_GELU)})")
        self.act = GeluAndMul(_GELU[act])


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config, rotary: RotaryEmbedding, layer_idx: int):
        super().__init__()
        self.self_attn = Gemma3Attention(config, rotary, layer_idx)
        self.mlp = Gemma3MLP(config)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(self, positions, h, residual):
        """(this layer's MLP output, residual stream before adding it), as in Llama's layers."""
        h, residual = add_and_norm(self.input_layernorm, h, residual)
        h = self.post_attention_layernorm(self.self_attn(positions, h))
        h, residual = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


def _rope_parameters(config, layer_type: str) -> dict:
    """transformers 5 keeps one rope dict per layer type (rope_theta for full_attention layers,
    rope_local_base_freq for sliding ones, the rope scaling on full_attention only)."""
    p = dict((getattr(config, "rope_parameters", None) or {}).get(layer_type) or {})
    if "rope_theta" not in p:
        raise ValueError(f"Gemma 3 config has no rope parameters for {layer_type} layers")
    p["rope_type"] = p.get("rope_type") or p.get("type") or "default"
    return p


class Gemma3ForCausalLM(LlamaForCausalLM):
    layer_cls = Gemma3DecoderLayer
    norm_cls = GemmaRMSNorm

    def __init__(self, config, max_position: int | None = None):
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("Gemma 3 with use_bidirectional_attention (EmbeddingGemma) is not "
                             "supported for text generation")
        super().__init__(config, max_position)
        # transformers multiplies by the scale cast to the weights' dtype
        self.embed_scale = float(torch.tensor(config.hidden_size ** 0.5,
                                              dtype=self.embed_tokens.weight.dtype))
        self.final_soft_cap = getattr(config, "final_logit_softcapping", None) or None

    def rotary_embeddings(self, config, max_position: int) -> list[RotaryEmbedding]:
        kinds = list(config.layer_types)[:config.num_hidden_layers]
        tables = {k: RotaryEmbedding(config.head_dim, max_position, _rope_parameters(config, k))
                  for k in dict.fromkeys(kinds)}
        return [tables[k] for k in kinds]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embed_scale

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)
        if self.final_soft_cap is not None:
            logits = torch.tanh(logits / self.final_soft_cap) * self.final_soft_cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Gemma3ForCausalLM names, or Gemma3ForConditionalGeneration's with the vision tower
        and projector skipped."""
        def text_only():
            for name, tensor in weights:
                if name.startswith(_VISION_PREFIXES):
                    continue
                for old, new in _TEXT_PREFIXES:
                    if name.startswith(old):
                        name = new + name[len(old):]
                        break
                yield name, tensor
        loaded = super().load_weights(text_only())
        for m in self.modules():
            if isinstance(m, GemmaRMSNorm):
                m.refresh()
        return loaded


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """The language model only (text in, text out), from the composite config's text_config."""

    def __init__(self, config, max_position: int | None = None):
        super().__init__(getattr(config, "text_config", None) or config, max_position)
