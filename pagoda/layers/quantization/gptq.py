"""GPTQ checkpoints (AutoGPTQ / GPTQModel, 4 bits): per linear layer `qweight` int32 [K / 8, N]
(eight input rows a word, row 8r + i in bits 4i..4i+3), `qzeros` int32 [G, N / 8] (eight
columns a word, column 8c + i in bits 4i..), `scales` fp16 [G, N], `g_idx` int32 [K] (the
group of each input row; act-order / desc_act checkpoints permute it). W[n, k] =
(code[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n], where the stored zero is zero - 1 in the
original ("v1") format and the zero itself in checkpoint_format gptq_v2."""
from __future__ import annotations

from typing import Optional

import torch


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    return (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 15


def unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
           g_idx: Optional[torch.Tensor], group: int, v2: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [K, N], zeros [G, N] as floats, scales [G, N], g_idx [K])."""
    kp, n = qweight.shape
    codes = _nibbles(qweight).permute(0, 2, 1).reshape(8 * kp, n).to(torch.uint8)
    zeros = _nibbles(qzeros).reshape(qzeros.shape[0], -1).float()
    if not v2:
        zeros = (zeros + 1) % 16  # v1 stores zero - 1 (in 4 bits: a stored 15 is a zero of 0)
    if g_idx is None:
        g_idx = torch.arange(8 * kp, device=qweight.device) // group
    return codes, zeros, scales, g_idx
