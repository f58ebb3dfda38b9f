"""Weight formats of the linear layers (--quantization), applied after the weights are loaded:
gguf.py (a GGUF's blocks kept packed on the CPU; int4), and int8 in pagoda/layers/linear.py."""
from __future__ import annotations

METHODS = ("int8", "int4")


def quantize_model(model, method: str) -> None:
    """Put every Linear and LMHead of `model` in the format of --quantization `method` (none:
    the loaded floats stay, and the GGUF blocks the loader handed on are let go)."""
    from pagoda.layers.embedding import LMHead
    from pagoda.layers.linear import Linear
    layers = [m for m in model.modules() if isinstance(m, (Linear, LMHead))]
    if method == "int4" and any(m.weight.device.type != "cpu" for m in layers):
        raise ValueError("--quantization: int4 runs on the CPU only so far; use int8 or none on CUDA")
    for m in layers:
        if method in METHODS:
            m.quantize(method)
        else:
            m.drop_gguf()
