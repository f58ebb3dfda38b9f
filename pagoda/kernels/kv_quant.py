"""Quantized KV cache: the formats, and the torch reference of the quantize (on write) and
dequantize (on read) steps that the Triton kernels in attention_triton.py fuse into the cache
write and the attention loop.

- int8 / int4: asymmetric, one (scale, zero) pair per token per KV head (LMDeploy's scheme),
  x ~ q * scale + zero with q in 0..255 / 0..15. The pairs sit in a float16 tensor beside the
  data, indexed like it: params [2, num_blocks, block_size, num_kv_heads, 2]. int4 packs two
  values per byte along head_dim: byte j holds element 2j in its low nibble, 2j + 1 in its high.
  The scale and zero are rounded to float16 *before* the values are quantized, so the stored
  pair is exactly the one the values were rounded against.
- fp8 (e4m3 / e5m2): x / scale stored as fp8, one scale per tensor (K and V each; 1.0 unless
  measured), saturated at the format's largest finite value (a cast alone would give NaN).

Rounding is floor(y + 0.5) in fp32 on both paths (Triton has no round-half-even), so the two
agree bit for bit except where fp32 division rounds differently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

KINDS = ("int8", "int4", "fp8_e4m3", "fp8_e5m2")
FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
LEVELS = {"int8": 255, "int4": 15}
PARAM_DTYPE = torch.float16


@dataclass(frozen=True)
class KVQuant:
    """How one layer's cache holds its values (None in the kernels' `kv_quant` = as --dtype).
    params: int8/int4 (scale, zero) pairs [2, num_blocks, block_size, num_kv_heads, 2];
    k_scale / v_scale: fp8's per-tensor scales."""
    kind: str
    params: Optional[torch.Tensor] = None
    k_scale: float = 1.0
    v_scale: float = 1.0

    @property
    def code(self) -> int:
        """The Triton kernels' KV_QUANT constant: 1 int8, 2 int4, 3 fp8."""
        return {"int8": 1, "int4": 2}.get(self.kind, 3)


def storage(kind: Optional[str], head_dim: int, dtype: torch.dtype) -> tuple[torch.dtype, int]:
    """(element dtype, last dim) of the data tensor for a format (None: `dtype` as is)."""
    if kind is None:
        return dtype, head_dim
    if kind == "int4":
        if head_dim % 2:
            raise ValueError(f"--kv-cache-dtype: int4 packs two values a byte and needs an even "
                             f"head_dim, got {head_dim}")
        return torch.uint8, head_dim // 2
    if kind == "int8":
        return torch.uint8, head_dim
    return FP8_DTYPES[kind], head_dim


def bytes_per_token_head(kind: Optional[str], head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one K (or V) vector of one head in the cache, its (scale, zero) included."""
    sdt, last = storage(kind, head_dim, dtype)
    extra = 2 * PARAM_DTYPE.itemsize if kind in LEVELS else 0
    return last * sdt.itemsize + extra


def quantize(x: torch.Tensor, kind: str, scale: float = 1.0
             ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """x [T, H, D] -> (data [T, H, D or D/2], params [T, H, 2] float16 or None for fp8)."""
    xf = x.float()
    if kind in FP8_DTYPES:
        m = FP8_MAX[kind]
        return (xf / scale).clamp(-m, m).to(FP8_DTYPES[kind]), None
    levels = LEVELS[kind]
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    s = ((hi - lo) / levels).to(PARAM_DTYPE)
    z = lo.to(PARAM_DTYPE)
    sf = s.float()
    inv = torch.where(sf > 0, 1.0 / sf, torch.zeros_like(sf))
    q = torch.floor((xf - z.float()) * inv + 0.5).clamp(0, levels).to(torch.uint8)
    if kind == "int4":
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, torch.cat([s, z], -1)


def dequantize(data: torch.Tensor, params: Optional[torch.Tensor], kind: str, scale: float = 1.0,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of quantize for any leading shape: data [..., D or D/2], params [..., 2]."""
    if kind in FP8_DTYPES:
        return (data.float() * scale).to(dtype)
    if kind == "int4":
        data = torch.stack([data & 15, data >> 4], -1).flatten(-2)
    p = params.float()
    return (data.float() * p[..., :1] + p[..., 1:]).to(dtype)


def write_cache_torch(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, kv: KVQuant,
                      slot_mapping: torch.Tensor) -> None:
    """reshape_and_cache for a quantized cache: quantize k, v [T, H, D] and store the values
    and their (scale, zero) at slot_mapping (slots < 0 skipped)."""
    nb, bs, h = kv_cache.shape[1], kv_cache.shape[2], kv_cache.shape[3]
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    flat = kv_cache.view(2, nb * bs, h, kv_cache.shape[4])
    for i, (x, sc) in enumerate(((k, kv.k_scale), (v, kv.v_scale))):
        data, params = quantize(x, kv.kind, sc)
        if data.dtype.itemsize == 1 and data.dtype != torch.uint8:  # fp8: copy the bytes
            flat[i].view(torch.uint8).index_copy_(0, slot_mapping, data.view(torch.uint8))
        else:
            flat[i].index_copy_(0, slot_mapping, data)
        if params is not None:
            kv.params.view(2, nb * bs, h, 2)[i].index_copy_(0, slot_mapping, params)


def read_blocks(kv_cache: torch.Tensor, kv: Optional[KVQuant], which: int, blocks: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """kv_cache[which][blocks] as floats of `dtype`: [*blocks.shape, block_size, H, D]. Only the
    blocks asked for are read and dequantized (the cache itself stays quantized)."""
    data = kv_cache[which][blocks]
    if kv is None:
        return data
    params = kv.params[which][blocks] if kv.params is not None else None
    return dequantize(data, params, kv.kind, kv.k_scale if which == 0 else kv.v_scale, dtype)
