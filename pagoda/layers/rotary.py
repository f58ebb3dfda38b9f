"""Rotary position embedding with the rope scalings our model families use (default, linear,
llama3). The cos|sin table is precomputed once for every position up to max_position."""
from __future__ import annotations

import math

import torch
from torch import nn

from pagoda.platforms import current_platform
from pagoda.kernels.rotary import gather_cos_sin
from pagoda.layers.attention import get_attention_metadata


def rope_parameters(config) -> dict:
    """transformers 5 keeps rope settings in config.rope_parameters; 4.x in rope_theta/rope_scaling."""
    p = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if scaling and not p.get("rope_type"):
        p.update(scaling)
    p.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    p["rope_type"] = p.get("rope_type") or p.get("type") or "default"
    return p


def inv_frequencies(rot_dim: int, params: dict) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and a position scale for the configured rope type."""
    base = float(params["rope_theta"])
    inv = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    kind = params["rope_type"]
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv, 1.0 / float(params["factor"])
    if kind == "llama3":
        factor = float(params["factor"])
        lo, hi = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, params: dict, rotary_dim: int | None = None):
        super().__init__()
        rot = rotary_dim or head_dim
        inv, pos_scale = inv_frequencies(rot, params)
        t = torch.arange(max_position, dtype=torch.float64) * pos_scale
        freqs = torch.outer(t, inv)
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self.ops = current_platform().ops

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        if self.ops.triton:
            return self.ops.rotary_embedding(positions, q, k, self.cos_sin_cache)
        cache = get_attention_metadata().cache  # one gather of cos/sin per step, not per layer

        def cos_sin():  # only the torch fallback needs it
            key = ("rope", id(self))
            if key not in cache:
                cache[key] = gather_cos_sin(positions, self.cos_sin_cache)
            return cache[key]
        return self.ops.rotary_embedding(positions, q, k, self.cos_sin_cache, cos_sin)

