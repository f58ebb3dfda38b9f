"""llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks as pagoda's CPU int8 groups, read straight from the file.

A block is 32 weights along K with an fp16 scale d (and, for Q4_1, an fp16 minimum m):
    Q4_0: d, 16 bytes of nibbles      w = d * (q - 8)    q in 0..15
    Q4_1: d, m, 16 bytes of nibbles   w = d * q + m      q in 0..15
    Q8_0: d, 32 signed bytes          w = d * q          q in -128..127
(nibble j of a block is byte j's low half for j < 16, byte j-16's high half after). Each is
exactly a group of pagoda's int8 format w = q * scale + min (pagoda/kernels/cpu_int8.py) with
q in 0..255, so the groups are taken as they are instead of dequantizing to float and searching
for a grid again; the float weights are computed from the groups with the kernel's own formula,
so the torch and C paths see identical values. Other types go through gguf.quants (numpy).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType as T

Groups = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q uint8 [N, K], scale, min f32 [N, K/32]
GROUP = 32
_BYTES = {T.Q4_0: 18, T.Q4_1: 20, T.Q8_0: 34}
# numpy, not torch: these are single passes over memory, and torch's two OpenMP threads ran them
# 10-100x slower whenever the 2-core machine had anything else to do (spinning barriers)


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] levels: low halves, then high halves. Four bytes at a time
    where the blocks allow an int32 view (Q4_1's 20-byte blocks do)."""
    out = np.empty((*qs.shape[:-1], 32), dtype=np.uint8)
    if qs.ctypes.data % 4 == 0 and all(st % 4 == 0 for st in qs.strides[:-1]):
        qs, out, mask = qs.view(np.int32), out.view(np.int32), 0x0F0F0F0F
    else:
        mask = 0x0F
    half = out.shape[-1] // 2
    np.bitwise_and(qs, mask, out=out[..., :half])
    np.right_shift(qs, 4, out=out[..., half:])
    np.bitwise_and(out[..., half:], mask, out=out[..., half:])
    return out.view(np.uint8)


def block_groups(raw: np.ndarray, qtype: T, shape: tuple[int, ...]) -> Optional[Groups]:
    """Groups of a 2-D tensor stored as Q4_0/Q4_1/Q8_0 blocks (raw: its bytes, [N, K/32*size]);
    None for any other type or shape."""
    if qtype not in _BYTES or len(shape) != 2:
        return None
    N, K = shape
    b = raw.reshape(N, K // GROUP, _BYTES[qtype])
    d = _half(b, 0)
    if qtype == T.Q4_1:
        q, mn = _nibbles(b[..., 4:]), _half(b, 2)
    elif qtype == T.Q4_0:
        q, mn = _nibbles(b[..., 2:]), -8.0 * d
    else:  # Q8_0: an int8 v as a byte with its top bit flipped is v + 128
        q, mn = b[..., 2:] ^ np.uint8(0x80), -128.0 * d
    return (torch.from_numpy(np.ascontiguousarray(q).reshape(N, K)), torch.from_numpy(d),
            torch.from_numpy(np.ascontiguousarray(mn, dtype=np.float32)))


def groups_to_float(g: Groups) -> torch.Tensor:
    """w = q * scale + min, as the C kernel computes it (q * scale is exact, so one rounding,
    as in its fma)."""
    q, s, m = (x.numpy() for x in g)
    N, K = q.shape
    w = q.reshape(N, -1, GROUP).astype(np.float32)
    w *= s[..., None]
    w += m[..., None]
    return torch.from_numpy(w.reshape(N, K))


def dequantize(raw: np.ndarray, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    """Any tensor of the file as float32 (plain floats viewed, other block types through gguf)."""
    if qtype == T.F32:
        return torch.from_numpy(raw.view(np.float32).reshape(shape).copy())
    if qtype == T.F16:
        return torch.from_numpy(raw.view(np.float16).reshape(shape).astype(np.float32))
    if qtype == T.BF16:  # numpy has no bfloat16: its bits are a float32's top half
        return torch.from_numpy((raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape))
    from gguf.quants import dequantize as gguf_dequantize
    try:
        arr = gguf_dequantize(raw, qtype)
    except NotImplementedError as e:
        raise ValueError(f"GGUF quantization {qtype.name} cannot be dequantized by the gguf package") from e
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(shape)
