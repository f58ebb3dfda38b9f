"""AWQ checkpoints (AutoAWQ's GEMM layout, 4 bits): per linear layer `qweight` int32 [K, N / 8],
`qzeros` int32 [K / group, N / 8], `scales` fp16 [K / group, N]; W[n, k] =
(code[k, n] - zero[k // group, n]) * scale[k // group, n]. Each int32 packs eight output columns
as nibbles, nibble i (bits 4i..4i+3) holding column 8c + ORDER[i]; read in bit order the columns
come as 0, 4, 1, 5, 2, 6, 3, 7. Unpacked here into int4.py's layout."""
from __future__ import annotations

import torch

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the column offset held by nibble i


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> codes uint8 [R, 8 C] in column order."""
    r, c = packed.shape
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    nib = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 15          # [R, C, 8] by nibble
    out = torch.empty_like(nib)
    out[..., list(ORDER)] = nib
    return out.reshape(r, 8 * c).to(torch.uint8)


def unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [K, N], zeros [G, N] as floats, scales [G, N])."""
    return unpack_columns(qweight), unpack_columns(qzeros).float(), scales
