"""Arguments for Triton launches that must not cause a compile mid-serving."""
from __future__ import annotations

from typing import Optional

import torch


def aligned(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """t dense, in `dtype`, at a 16-byte-aligned address: Triton specializes a kernel on its
    pointers' alignment, and a column of a one-row batch is a view at an odd offset — a compile
    in the middle of serving. A copy of a few numbers is cheaper."""
    t = t.to(dtype).contiguous() if dtype is not None else t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()
