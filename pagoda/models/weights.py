"""Loading checkpoint tensors into modules whose names mirror the checkpoint's (decoders, vision towers,
projectors): merged projections take their shards (q_proj/k_proj/v_proj -> qkv_proj), a
convolution whose kernel equals its stride may be held as a Linear over flattened patches,
layers with `load_full` take their rank's part (tensor parallelism), everything else is copied by
name with its shape checked. Tensors may be lazy safetensors slices, read only where needed.

`expected_names` lists what a full load fills, in the same "name#shard" form, so a missing
tensor is an error at start and not a silently random weight.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from pagoda.layers.embedding import shape_of
from pagoda.layers.linear import PACKED_PARAMS, Linear

# checkpoint name fragment -> (our merged module fragment, shard index)
QKV_PACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2)}


def load_named(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
               packed: dict[str, tuple[str, int]] = QKV_PACKED) -> set[str]:
    """Copy (name, tensor) pairs named relative to `module` into it; returns what was filled."""
    params = dict(module.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for name, tensor in weights:
        for frag, (merged, shard) in packed.items():
            if f".{frag}." in f".{name}":
                mod_name, pname = f".{name}".replace(f".{frag}.", f".{merged}.")[1:].rsplit(".", 1)
                target = module.get_submodule(mod_name)
                if isinstance(target, Linear):
                    target.load_shard(shard, pname, tensor)
                    loaded.add(f"{mod_name}.{pname}#{shard}")
                    break
        else:
            if name not in params:
                mod_name, _, pname = name.rpartition(".")
                mod = module.get_submodule(mod_name) if pname in PACKED_PARAMS else None
                if not isinstance(mod, Linear):
                    raise ValueError(f"checkpoint tensor {name!r} has no place in {type(module).__name__}")
                mod.load_full(pname, tensor)  # a quantized checkpoint's qweight, scales, ...
                loaded.add(name)
                continue
            p = params[name]
            shape = shape_of(tensor)
            if shape != tuple(p.shape) and len(shape) > 2:
                if p.numel() != math.prod(shape) or p.dim() != 2:
                    raise ValueError(f"shape mismatch for {name}: checkpoint {shape} vs "
                                     f"model {tuple(p.shape)}")
                tensor = materialize(tensor).reshape(p.shape)  # a patch convolution held as a Linear
            mod_name, _, pname = name.rpartition(".")
            mod = module.get_submodule(mod_name)
            if hasattr(mod, "load_full"):  # takes this rank's part (tensor parallelism)
                mod.load_full(pname, tensor)
            else:
                tensor = materialize(tensor)
                if p.shape != tensor.shape:
                    raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)} vs "
                                     f"model {tuple(p.shape)}")
                p.data.copy_(tensor)
            loaded.add(name)
    return loaded


def materialize(tensor) -> torch.Tensor:
    """A checkpoint tensor as a torch tensor (a lazy safetensors slice is read whole)."""
    return tensor if isinstance(tensor, torch.Tensor) else tensor[:]


def expected_names(module: nn.Module) -> set[str]:
    names = set()
    linears = {n: m for n, m in module.named_modules() if isinstance(m, Linear)}
    for mname, mod in linears.items():
        for pname in ("weight", "bias"):
            if getattr(mod, pname) is None:
                continue
            if len(mod.shard_sizes) > 1:
                names |= {f"{mname}.{pname}#{i}" for i in range(len(mod.shard_sizes))}
            else:
                names.add(f"{mname}.{pname}")
    for n, _ in module.named_parameters():
        if n.rsplit(".", 1)[0] not in linears:
            names.add(n)
    return names
