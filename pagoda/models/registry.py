"""HF `architectures` name -> pagoda model class, for generation and for pooling.

A checkpoint pools when its architecture is a pooling one (encoders, ...ForSequenceClassification)
or when `--runner pooling` / `--convert embed|classify` turn a decoder into one (vLLM's flags):
the decoder then runs on the KV cache like any generative model, and its pooler reads the final
hidden state of the last prompt token (`pagoda.models.adapters`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

_MODELS = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    # text-only: the vision tower and projector weights are skipped
    "Gemma3ForConditionalGeneration": ("gemma3", "Gemma3ForConditionalGeneration"),
    # speech: an audio encoder, a text decoder on the KV cache (/v1/audio/transcriptions)
    "WhisperForConditionalGeneration": ("whisper", "WhisperForConditionalGeneration"),
}

# vision-language models: images in, text out (their config is the composite one)
_MULTIMODAL_MODELS = {
    "LlavaForConditionalGeneration": ("llava", "LlavaForConditionalGeneration"),
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_vl", "Qwen2_5_VLForConditionalGeneration"),
    "Idefics3ForConditionalGeneration": ("idefics3", "Idefics3ForConditionalGeneration"),
    "SmolVLMForConditionalGeneration": ("idefics3", "SmolVLMForConditionalGeneration"),
}


# architectures that pool natively: (module, class, kind); kind "embed" serves vectors,
# "classify" class logits (cross-encoders and rerankers with one label also serve scores)
_POOLING_MODELS = {
    "BertModel": ("bert", "BertModel", "embed"),
    "BertForMaskedLM": ("bert", "BertModel", "embed"),  # same encoder under `bert.`; the MLM head is unused
    "BertForSequenceClassification": ("bert", "BertForSequenceClassification", "classify"),
    "RobertaModel": ("roberta", "RobertaModel", "embed"),
    "RobertaForMaskedLM": ("roberta", "RobertaModel", "embed"),
    "XLMRobertaModel": ("roberta", "XLMRobertaModel", "embed"),
    "XLMRobertaForMaskedLM": ("roberta", "XLMRobertaModel", "embed"),
    "RobertaForSequenceClassification": ("roberta", "RobertaForSequenceClassification", "classify"),
    "XLMRobertaForSequenceClassification": ("roberta", "XLMRobertaForSequenceClassification", "classify"),
    # decoders saved without their LM head (embedding checkpoints) and decoder classifiers
    "LlamaModel": ("llama", "LlamaForCausalLM", "embed"),
    "Qwen2Model": ("qwen2", "Qwen2ForCausalLM", "embed"),
    "Qwen3Model": ("qwen3", "Qwen3ForCausalLM", "embed"),
    "LlamaForSequenceClassification": ("llama", "LlamaForCausalLM", "classify"),
    "Qwen2ForSequenceClassification": ("qwen2", "Qwen2ForCausalLM", "classify"),
    "Qwen3ForSequenceClassification": ("qwen3", "Qwen3ForCausalLM", "classify"),
}
# encoder modules: everything else in _POOLING_MODELS is a decoder run through an adapter
_ENCODER_MODULES = ("bert", "roberta")


@dataclass(frozen=True)
class PoolingModel:
    """How a checkpoint pools: `kind` embed | classify; `decoder`: a causal model on the KV cache
    (last-token pooling) rather than an encoder read whole."""
    architecture: str
    kind: str
    decoder: bool
    module: str
    cls: str


def supported_architectures() -> list[str]:
    return sorted({**_MODELS, **_MULTIMODAL_MODELS})


def _architectures(config) -> list[str]:
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:  # configs built in code (e.g. LlamaConfig()) carry no architectures
        archs = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "bert": "BertModel", "roberta": "RobertaModel",
                  "xlm-roberta": "XLMRobertaModel",
                  # a Gemma3ForConditionalGeneration's text_config (what the engine runs) and
                  # GGUF-converted configs carry no architectures
                  "gemma3_text": "Gemma3ForCausalLM", "gemma3": "Gemma3ForConditionalGeneration",
                  "whisper": "WhisperForConditionalGeneration",
                  "llava": "LlavaForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration",
                  "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                  "idefics3": "Idefics3ForConditionalGeneration",
                  "smolvlm": "SmolVLMForConditionalGeneration",
                  }.get(getattr(config, "model_type", ""), "")]
    return archs


def architecture_of(config) -> str:
    archs = _architectures(config)
    return archs[0] if archs else ""


def pooling_model(config, runner: str = "auto", convert: str = "auto") -> PoolingModel | None:
    """How `config`'s checkpoint pools under --runner / --convert, or None when it generates.
    ValueError (naming the flag) for a combination that cannot run."""
    archs = _architectures(config)
    native = next((a for a in archs if a in _POOLING_MODELS), None)
    generative = next((a for a in archs if a in _MODELS), None)
    if native is not None:
        mod, cls, kind = _POOLING_MODELS[native]
        if runner == "generate":
            raise ValueError(f"--runner: {native} is a pooling model; it cannot generate text "
                             "(use --runner pooling or auto)")
        if convert not in ("auto", "none", kind):
            if kind == "embed" and mod in _ENCODER_MODULES:
                raise ValueError(f"--convert: {native} has no classification head; it embeds "
                                 "(use --convert auto)")
            kind = convert  # a decoder: its own head is replaced (classify needs `score` weights)
        return PoolingModel(native, kind, mod not in _ENCODER_MODULES, mod, cls)
    if runner == "pooling" or convert in ("embed", "classify"):
        mm = next((a for a in archs if a in _MULTIMODAL_MODELS), None)
        if mm is not None:
            raise ValueError(f"--runner/--convert: {mm} is a vision-language model; it only generates")
    if generative is None or (runner != "pooling" and convert in ("auto", "none")):
        return None
    if convert == "none":
        raise ValueError(f"--runner pooling: {generative} generates text; add --convert embed or "
                         "--convert classify to pool with it")
    kind = "embed" if convert == "auto" else convert
    mod, cls = _MODELS[generative]
    return PoolingModel(generative, kind, True, mod, cls)


def is_embedding_model(config) -> bool:
    """Pools without any flag (its architecture is a pooling one)."""
    return any(a in _POOLING_MODELS for a in _architectures(config))


def resolve_pooling_class(pm: PoolingModel):
    cls = getattr(importlib.import_module(f"pagoda.models.{pm.module}"), pm.cls)
    if not pm.decoder:
        return cls
    from pagoda.models.adapters import as_classification_model, as_embedding_model
    return as_embedding_model(cls) if pm.kind == "embed" else as_classification_model(cls)


def resolve_model_class(config):
    archs = _architectures(config)
    if is_embedding_model(config):
        raise ValueError(f"model architecture {archs} is a pooling model: it serves /v1/embeddings, "
                         "/pooling, /classify, /score (LLM.embed(), LLM.classify(), ...), not text "
                         "generation")
    for a in archs:
        entry = _MODELS.get(a) or _MULTIMODAL_MODELS.get(a)
        if entry is not None:
            mod, cls = entry
            return getattr(importlib.import_module(f"pagoda.models.{mod}"), cls)
    raise ValueError(f"model architecture {archs} is not supported; supported: "
                     f"{', '.join(supported_architectures())}")


def is_multimodal_model(config) -> bool:
    return any(a in _MULTIMODAL_MODELS for a in _architectures(config))
