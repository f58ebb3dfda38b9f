"""Qwen2 / Qwen2.5: Llama layout with a bias on the q, k and v projections."""
from __future__ import annotations

from pagoda.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen2Attention(LlamaAttention):
    def qkv_bias(self, config) -> bool:
        return True

    def o_bias(self, config) -> bool:
        return False


class Qwen2DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen2Attention


class Qwen2ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen2DecoderLayer
