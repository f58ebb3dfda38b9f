"""Rotary position embedding (neox / rotate-half style, as HF Llama and Qwen), plain torch.

cos_sin_cache: [max_positions, rotary_dim] = [cos(pos * inv_freq) | sin(pos * inv_freq)], float32.
"""
from __future__ import annotations

import torch


def gather_cos_sin(positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """(cos, sin), each [T, 1, rot/2], for these positions (shared by every layer of a step)."""
    cs = cos_sin_cache[positions]                      # [T, rot]
    half = cs.shape[-1] // 2
    return cs[:, :half].unsqueeze(1), cs[:, half:].unsqueeze(1)


def rotary_embedding_torch(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           cos_sin_cache: torch.Tensor, cos_sin=None) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hk, D]; rotates the first rotary_dim features, returns new q, k.
    `cos_sin` may carry gather_cos_sin's result, or a function returning it (computed once for the
    step, on first use)."""
    if callable(cos_sin):
        cos_sin = cos_sin()
    cos, sin = cos_sin if cos_sin is not None else gather_cos_sin(positions, cos_sin_cache)
    half = cos.shape[-1]

    def rot(x):
        rd = 2 * half
        xr = x[..., :rd].float()
        x1, x2 = xr[..., :half], xr[..., half:]
        o = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
        return o if rd == x.shape[-1] else torch.cat((o, x[..., rd:]), dim=-1)

    return rot(q), rot(k)
