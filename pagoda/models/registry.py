"""HF `architectures` name -> pagoda model class."""
from __future__ import annotations

import importlib

_MODELS = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_model_class(config):
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:  # configs built in code (e.g. LlamaConfig()) carry no architectures
        archs = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}.get(getattr(config, "model_type", ""), "")]
    for a in archs:
        if a in _MODELS:
            mod, cls = _MODELS[a]
            return getattr(importlib.import_module(f"pagoda.models.{mod}"), cls)
    raise ValueError(f"model architecture {archs} is not supported; supported: "
                     f"{', '.join(supported_architectures())}")
