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



class MRotaryEmbedding(RotaryEmbedding):
    """Multimodal rotary embedding (Qwen2-VL's M-RoPE): each token has three positions
    (temporal, height, width); the rotary frequencies are split into `mrope_section` chunks
    and chunk i rotates by position axis i % 3. Text tokens carry three equal positions, which
    is plain rotary: 1-D positions take the parent's path (decode steps, CUDA graphs); [3, T]
    positions build this step's per-token cos|sin rows once and rotate through the same
    kernels (positions 0..T-1 into that table)."""

    def __init__(self, head_dim: int, max_position: int, params: dict, mrope_section: list[int],
                 rotary_dim: int | None = None):
        super().__init__(head_dim, max_position, params, rotary_dim)
        half = self.cos_sin_cache.shape[1] // 2
        if sum(mrope_section) != half:
            raise ValueError(f"mrope_section {mrope_section} must add up to rotary_dim / 2 = {half}")
        axis = torch.repeat_interleave(torch.arange(len(mrope_section)) % 3, torch.tensor(mrope_section))
        self.register_buffer("column_axis", torch.cat((axis, axis)), persistent=False)  # [rot]

    def step_table(self, positions: torch.Tensor) -> torch.Tensor:
        """[T, rot] cos|sin rows of tokens at positions [3, T]."""
        cols = torch.arange(self.column_axis.numel(), device=positions.device)
        return self.cos_sin_cache[positions[self.column_axis].t(), cols].contiguous()

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        if positions.dim() == 1:
            return super().forward(positions, q, k)
        cache = get_attention_metadata().cache
        key = ("mrope", id(self))
        if key not in cache:
            table = self.step_table(positions)
            flat = torch.arange(table.shape[0], device=table.device)
            cache[key] = (flat, table, gather_cos_sin(flat, table))
        flat, table, cs = cache[key]
        return self.ops.rotary_embedding(flat, q, k, table, cs) if not self.ops.triton else \
            self.ops.rotary_embedding(flat, q, k, table)


class VisionRotaryEmbedding(nn.Module):
    """2-D rotary of a vision tower (Qwen2-VL's ViT): the first half of the rotary frequencies
    turns with a patch's row, the second half with its column (both from the same
    1 / theta^(2i / (head_dim / 2)) ladder), over the whole head."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        spatial = head_dim // 2
        inv = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.ops = current_platform().ops

    def table(self, hw: torch.Tensor) -> torch.Tensor:
        """hw: [N, 2] (row, column) of each patch -> [N, head_dim] cos|sin rows (float32)."""
        freqs = hw.unsqueeze(-1).float() * self.inv_freq.float()   # [N, 2, head_dim / 4]
        freqs = freqs.reshape(hw.shape[0], -1)                       # [N, head_dim / 2]
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1)

    def forward(self, table: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        flat = torch.arange(table.shape[0], device=table.device)
        if self.ops.triton:
            return self.ops.rotary_embedding(flat, q, k, table)
        return self.ops.rotary_embedding(flat, q, k, table, gather_cos_sin(flat, table))
