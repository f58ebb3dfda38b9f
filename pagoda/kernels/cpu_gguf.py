"""Matmul with GGUF block weights kept packed (the C kernel in cpu_gguf.c) and its torch reference.

A weight is one or more parts: rows of raw GGUF blocks (uint8 [n, row_bytes]) of one ggml type,
each writing its own run of output columns, so a merged projection whose shards differ in type
(a Q4_K_M file's q/k in Q4_K and v in Q6_K) is still one call. Activations stay float32. The
reference multiplies by `gguf.quants.dequantize` of the same bytes.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from pagoda.kernels import cpu_build

# ggml type id -> (weights per block, bytes per block): the types the kernel multiplies with
BLOCKS = {2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
          12: (256, 144), 13: (256, 176), 14: (256, 210)}
MAX_PARTS = 8

_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class GgufPart(ctypes.Structure):
    """cpu_gguf.c's GgufPart."""
    _fields_ = [("data", _P), ("type", _I64), ("n", _I64), ("row_bytes", _I64), ("col0", _I64)]


_SIGNATURES = {
    "pagoda_gguf_gemm": [_P, _I64, _I64, _P, _I64, _P, _P, _I64],
    "pagoda_gguf_dequant": [_P, _I64, _I64, _I64, _P],
}


def _lib(isa: Optional[str] = None):
    return cpu_build.load("cpu_gguf", _SIGNATURES, isa)


def available(isa: Optional[str] = None) -> bool:
    return _lib(isa) is not None


def supports(ggml_type: int, k: int) -> bool:
    """Whether the kernel multiplies with rows of `k` weights of this ggml type."""
    return ggml_type in BLOCKS and k % BLOCKS[ggml_type][0] == 0


@dataclass
class Part:
    """Rows of raw blocks of one ggml type, and the first output column they write."""
    data: torch.Tensor   # uint8 [n, row_bytes], contiguous
    type: int
    col0: int = 0

    @property
    def n(self) -> int:
        return self.data.shape[0]


def make_parts(parts: Sequence[Part]) -> ctypes.Array:
    """The C array of parts (keep it, and the parts' tensors, alive while it is used)."""
    if not 0 < len(parts) <= MAX_PARTS:
        raise ValueError(f"1 to {MAX_PARTS} parts, got {len(parts)}")
    arr = (GgufPart * len(parts))()
    for i, p in enumerate(parts):
        assert p.data.dtype == torch.uint8 and p.data.is_contiguous() and p.type in BLOCKS
        arr[i] = GgufPart(p.data.data_ptr(), p.type, p.n, p.data.shape[1], p.col0)
    return arr


def dequantize_torch(data: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Reference: gguf.quants.dequantize of rows of blocks -> float32 [n, K]."""
    from gguf.quants import dequantize
    from gguf import GGMLQuantizationType
    arr = dequantize(data.numpy(), GGMLQuantizationType(ggml_type))
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def dequantize(data: torch.Tensor, ggml_type: int, isa: Optional[str] = None) -> torch.Tensor:
    """The kernel's own widening of rows of blocks -> float32 [n, K]."""
    per, size = BLOCKS[ggml_type]
    n, k = data.shape[0], data.shape[1] // size * per
    out = torch.empty(n, k, dtype=torch.float32)
    _lib(isa).pagoda_gguf_dequant(data.contiguous().data_ptr(), ggml_type, n, k, out.data_ptr())
    return out


def gguf_matmul_torch(x: torch.Tensor, parts: Sequence[Part], n: int,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference: x @ dequantize(W)^T (+ bias) with the parts' rows placed at their columns."""
    y = torch.zeros(x.shape[0], n, dtype=torch.float32)
    for p in parts:
        y[:, p.col0:p.col0 + p.n] = x.float() @ dequantize_torch(p.data, p.type).T
    return y + bias.float() if bias is not None else y


def gguf_matmul(x: torch.Tensor, parts: ctypes.Array, k: int, n: int,
                bias: Optional[torch.Tensor] = None, isa: Optional[str] = None) -> torch.Tensor:
    """y[M, n] = x[M, k] @ W^T (+ bias), float32, through the C kernel; `parts` from make_parts."""
    x = x.float().contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    _lib(isa).pagoda_gguf_gemm(x.data_ptr(), x.shape[0], k, ctypes.addressof(parts), len(parts),
                               bias.data_ptr() if bias is not None else None, y.data_ptr(), n)
    return y
