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
    from pagoda.models.registry import architecture_of, is_multimodal_model, pooling_model
    src = loader.resolve_model(args.model, args.tokenizer, args.revision, args.download_dir)
    hf = loader.load_config(src, args.trust_remote_code)
    pm = pooling_model(hf, args.runner, args.convert)
    if pm is not None and not pm.decoder and src.gguf_file:
        raise ValueError("--model: GGUF encoder models are not supported; pass an HF directory")
    # a vision-language model keeps its composite config (the model is built from it); the
    # limits, vocabulary and EOS come from its language model's
    mm_config = hf if pm is None and not src.gguf_file and is_multimodal_model(hf) else None
    if mm_config is not None:
        hf = hf.get_text_config()
    elif pm is None or pm.decoder:
        hf = text_config(hf)
    # Whisper: the decoder's learned positions bound the text
    max_pos = int(getattr(hf, "max_position_embeddings", 0) or getattr(hf, "max_target_positions", 0)
                  or 0) or 2048
    if pm is not None and pm.module == "roberta":  # positions start after padding_idx
        max_pos -= int(hf.pad_token_id) + 1
    if args.max_model_len and args.max_model_len > max_pos:
        raise ValueError(f"--max-model-len: {args.max_model_len} exceeds the model's "
                         f"max_position_embeddings ({max_pos})")
    mc = ModelConfig(
        model=src.name, served_model_names=list(args.served_model_name or [src.name]),
        max_model_len=args.max_model_len or max_pos, vocab_size=int(hf.vocab_size),
        architecture=architecture_of(mm_config or hf), runner="pooling" if pm is not None else "generate",
        hf_config=hf, generation_config=dict(src.generation_config),
        eos_token_ids=eos_token_ids(src, hf, tokenizer), mm_hf_config=mm_config,
        is_encoder_decoder=bool(getattr(hf, "is_encoder_decoder", False)) and pm is None)
    if pm is not None:
        _pooling_config(mc, pm, src)
    return src, mc


def _pooling_config(mc: ModelConfig, pm, src: ModelSource) -> None:
    """What a pooling model computes, read from its config and sentence-transformers files."""
    from pagoda.layers.pooler import PoolingConfig
    hf = mc.hf_config
    mc.pooling_kind, mc.pooling_model = pm.kind, pm
    if pm.kind == "classify":
        # the head reads one token: [CLS] / <s> for encoders, the last token for decoders
        mc.pooler_config = PoolingConfig(("lasttoken" if pm.decoder else "cls",), normalize=False)
        mc.id2label = {int(k): str(v) for k, v in (getattr(hf, "id2label", None) or {0: "LABEL_0"}).items()}
    else:
        cfg = PoolingConfig.from_model_dir(src.config_dir, "lasttoken" if pm.decoder else "mean")
        if pm.decoder and cfg.modes != ("lasttoken",):
            raise ValueError(f"--model: {pm.architecture} pools with {', '.join(cfg.modes)} in its "
                             "sentence-transformers files; decoder models pool the last token only")
        mc.pooler_config = cfg
        mc.embedding_size = int(hf.hidden_size) * len(cfg.modes)
        dims = getattr(hf, "matryoshka_dimensions", None)
        if dims is not None or getattr(hf, "is_matryoshka", False):
            mc.matryoshka_dimensions = sorted(int(d) for d in dims or [])
    mc.uses_token_type_ids = not pm.decoder and int(getattr(hf, "type_vocab_size", 0) or 0) > 1
