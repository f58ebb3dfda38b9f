"""EngineArgs -> (where the model is, ModelConfig): the model's limits read from its config alone,
so the API server learns them without loading weights and the engine core the same way."""
from __future__ import annotations

from typing import Any, Optional

from pagoda.config import EngineArgs, ModelConfig
from pagoda.worker import loader
from pagoda.worker.loader import ModelSource


def text_config(hf_config: Any) -> Any:
    """Multimodal checkpoints nest the language model's config."""
    if getattr(hf_config, "text_config", None) is not None and not hasattr(hf_config, "num_hidden_layers"):
        return hf_config.text_config
    return hf_config


def eos_token_ids(src: ModelSource, hf_config: Any, tokenizer: Optional[Any]) -> tuple[int, ...]:
    eos: set[int] = set()
    for e in (src.generation_config.get("eos_token_id"), getattr(hf_config, "eos_token_id", None),
              tokenizer.eos_token_id if tokenizer is not None else None):
        if isinstance(e, int):
            eos.add(e)
        elif isinstance(e, (list, tuple)):
            eos.update(int(x) for x in e)
    return tuple(sorted(eos))


def resolve_model_config(args: EngineArgs, tokenizer: Optional[Any] = None) -> tuple[ModelSource, ModelConfig]:
    from pagoda.models.registry import architecture_of, is_embedding_model, is_multimodal_model
    src = loader.resolve_model(args.model, args.tokenizer, args.revision, args.download_dir)
    hf = loader.load_config(src, args.trust_remote_code)
    pooling = not src.gguf_file and is_embedding_model(hf)
    # a vision-language model keeps its composite config (the model is built from it); the
    # limits, vocabulary and EOS come from its language model's
    mm_config = hf if not pooling and not src.gguf_file and is_multimodal_model(hf) else None
    if mm_config is not None:
        hf = hf.get_text_config()
    elif not pooling:
        hf = text_config(hf)
    max_pos = int(getattr(hf, "max_position_embeddings", 0) or 0) or 2048
    if args.max_model_len and args.max_model_len > max_pos:
        raise ValueError(f"--max-model-len: {args.max_model_len} exceeds the model's "
                         f"max_position_embeddings ({max_pos})")
    return src, ModelConfig(
        model=src.name, served_model_names=list(args.served_model_name or [src.name]),
        max_model_len=args.max_model_len or max_pos, vocab_size=int(hf.vocab_size),
        architecture=architecture_of(mm_config or hf), runner="pooling" if pooling else "generate",
        hf_config=hf, generation_config=dict(src.generation_config),
        eos_token_ids=eos_token_ids(src, hf, tokenizer), mm_hf_config=mm_config)
