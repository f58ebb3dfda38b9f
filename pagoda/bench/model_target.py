"""Which model a benchmark runs and how each backend gets it.

Either a real model (--model: directory, hub id or .gguf; default the bundled one) or a
random-weight shape (--model-shape), which pagoda loads from a config-only directory with
dummy weights and transformers builds from the same config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelTarget:
    shape: Optional[str]           # a name from shapes.SHAPES, or None for a real model
    model: Optional[str]           # what pagoda loads (a temp dir for shapes)
    engine_kwargs: dict            # EngineArgs fields for pagoda.llm.LLM / AsyncLLM
    device: str                    # cpu | cuda | cuda:N, resolved from --device
    dtype: str                     # float32 | bfloat16 | float16, resolved from --dtype

    @property
    def label(self) -> str:
        import os
        if self.shape:
            return self.shape
        return os.path.basename(self.model) if os.path.isfile(self.model) else self.model


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "float32" if device == "cpu" else "bfloat16"


def from_args(args) -> ModelTarget:
    """Build the target from parsed flags (EngineArgs flags plus --model-shape)."""
    from pagoda.config import EngineArgs
    from pagoda.bench import shapes
    from pagoda.worker.loader import bundled_model_path
    if args.model_shape and args.model:
        raise ValueError("--model-shape: give either --model-shape or --model, not both")
    from pagoda.bench.args import ENGINE_FLAGS_REPLACED
    ea = EngineArgs.from_cli_args(args, skip=ENGINE_FLAGS_REPLACED)
    device = resolve_device(ea.device)
    dtype = resolve_dtype(ea.dtype, device)
    kwargs = {f.name: getattr(ea, f.name) for f in dataclasses.fields(ea) if f.name != "extra"}
    if args.model_shape:
        kwargs["model"] = shapes.write_model_dir(args.model_shape)
        kwargs["load_format"] = "dummy"
        kwargs["skip_tokenizer_init"] = True
    elif not kwargs["model"]:
        kwargs["model"] = bundled_model_path()
    return ModelTarget(shape=args.model_shape, model=kwargs["model"], engine_kwargs=kwargs,
                       device=device, dtype=dtype)


def hf_config(target: ModelTarget):
    """The transformers config of the target (no weights loaded)."""
    from pagoda.bench import shapes
    from pagoda.worker import loader
    if target.shape:
        return shapes.make_config(target.shape)
    return loader.load_config(loader.resolve_model(target.model, revision=target.engine_kwargs.get("revision")))


def vocab_size(target: ModelTarget) -> int:
    cfg = hf_config(target)
    return getattr(cfg, "vocab_size", None) or cfg.get_text_config().vocab_size


def _dtype_bytes(target: ModelTarget) -> int:
    import torch
    return getattr(torch, target.dtype).itemsize


def weight_bytes(target: ModelTarget) -> int:
    """Bytes of the weights in the run dtype, counted on the meta device (tied weights once)."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(target))
    return sum(p.numel() for p in model.parameters()) * _dtype_bytes(target)


def kv_bytes_per_token(target: ModelTarget) -> int:
    """K and V of one token across all layers, in the run dtype."""
    cfg = hf_config(target)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * _dtype_bytes(target)


def cleanup(target: ModelTarget) -> None:
    if target.shape:
        from pagoda.bench.shapes import cleanup_model_dir
        cleanup_model_dir(target.model)
