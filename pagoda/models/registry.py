"""HF `architectures` name -> pagoda model class."""
from __future__ import annotations

import importlib

_MODELS = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    # text-only: the vision tower and projector weights are skipped
    "Gemma3ForConditionalGeneration": ("gemma3", "Gemma3ForConditionalGeneration"),
}

# vision-language models: images in, text out (their config is the composite one)
_MULTIMODAL_MODELS = {
    "LlavaForConditionalGeneration": ("llava", "LlavaForConditionalGeneration"),
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_vl", "Qwen2_5_VLForConditionalGeneration"),
    "Idefics3ForConditionalGeneration": ("idefics3", "Idefics3ForConditionalGeneration"),
    "SmolVLMForConditionalGeneration": ("idefics3", "SmolVLMForConditionalGeneration"),
}


# encoders that produce embeddings (pooled last hidden states), served on /v1/embeddings
_EMBEDDING_MODELS = {
    "BertModel": ("bert", "BertModel"),
    "BertForMaskedLM": ("bert", "BertModel"),  # same encoder under `bert.`; the MLM head is unused
}


def supported_architectures() -> list[str]:
    return sorted({**_MODELS, **_MULTIMODAL_MODELS})


def _architectures(config) -> list[str]:
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:  # configs built in code (e.g. LlamaConfig()) carry no architectures
        archs = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "bert": "BertModel",
                  # a Gemma3ForConditionalGeneration's text_config (what the engine runs) and
                  # GGUF-converted configs carry no architectures
                  "gemma3_text": "Gemma3ForCausalLM", "gemma3": "Gemma3ForConditionalGeneration",
                  "llava": "LlavaForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration",
                  "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                  "idefics3": "Idefics3ForConditionalGeneration",
                  "smolvlm": "SmolVLMForConditionalGeneration",
                  }.get(getattr(config, "model_type", ""), "")]
    return archs


def architecture_of(config) -> str:
    archs = _architectures(config)
    return archs[0] if archs else ""


def is_embedding_model(config) -> bool:
    return any(a in _EMBEDDING_MODELS for a in _architectures(config))


def resolve_embedding_class(config):
    for a in _architectures(config):
        if a in _EMBEDDING_MODELS:
            mod, cls = _EMBEDDING_MODELS[a]
            return getattr(importlib.import_module(f"pagoda.models.{mod}"), cls)
    raise ValueError(f"model architecture {_architectures(config)} is not an embedding model; "
                     f"supported: {', '.join(sorted(_EMBEDDING_MODELS))}")


def resolve_model_class(config):
    archs = _architectures(config)
    if is_embedding_model(config):
        raise ValueError(f"model architecture {archs} is an embedding model: it serves "
                         "/v1/embeddings (LLM.embed()), not text generation")
    for a in archs:
        entry = _MODELS.get(a) or _MULTIMODAL_MODELS.get(a)
        if entry is not None:
            mod, cls = entry
            return getattr(importlib.import_module(f"pagoda.models.{mod}"), cls)
    raise ValueError(f"model architecture {archs} is not supported; supported: "
                     f"{', '.join(supported_architectures())}")


def is_multimodal_model(config) -> bool:
    return any(a in _MULTIMODAL_MODELS for a in _architectures(config))
