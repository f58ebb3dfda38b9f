"""Quantized KV cache: the formats, and the torch reference of the quantize (on write) and
dequantize (on read) steps that the Triton kernels in attention_triton.py fuse into the cache
write and the attention loop.

- int8 / int4: asymmetric, one scale and one zero point per token per KV head (LMDeploy's
  scheme): scale = the row's range, widened to hold 0, over the levels (255 / 15); the zero
  point zp = the code of 0. int8: x ~ (q - zp) * scale, zp an integer 0..255. int4: the zero
  point is kept in sixteenths of a step, x ~ (q - zp / 16) * scale (a 4-bit code leaves the
  byte's spare bits to the zero's precision: rounding it to a whole step cost +4% perplexity on
  the bundled model). Beside the data, indexed like it without head_dim: scales float16 and zero
  points uint8, [2, num_blocks, block_size, num_kv_heads] each: 3 bytes a vector (64-dim heads:
  1.91x / 3.66x the tokens of a 16-bit cache; a float16 zero made int8 1.88x). int4 packs two
  values per byte along head_dim: byte j holds element 2j in its low nibble, 2j + 1 in its high.
  The scale is rounded to float16 *before* the values are quantized, so the stored scale is
  exactly the one the values were rounded against.
- int4 also rotates: the attention layer multiplies q, k and v by an orthonormal Hadamard
  matrix over head_dim before the cache write and the attention, and the output by its
  transpose after (`hadamard`; q.k and p.v are unchanged in exact arithmetic). K's few outlier
  channels are then spread over all of them, so one scale per token and head no longer leaves
  most channels one or two levels: perplexity on the bundled model +17% -> +7.4%. (Smoothing
  K's channels by per-layer factors moved into q, tried with and without the rotation, did not
  help: +17.7% / +11.7% at best.)
- fp8 (e4m3 / e5m2): x / scale stored as fp8, one scale per tensor (K and V each; 1.0, or
  measured on the first forward with --calculate-kv-scales: `calibrate`), saturated at the
  format's largest finite value (a cast alone would give NaN). The two scales live in a small
  float32 tensor on the cache's device that the kernels read, so a measured value reaches
  CUDA-graph replays too.

Rounding is floor(y + 0.5) in fp32 on both paths (Triton has no round-half-even), so the two
agree bit for bit except where fp32 division rounds differently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import math

import torch

KINDS = ("int8", "int4", "fp8_e4m3", "fp8_e5m2")
FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
LEVELS = {"int8": 255, "int4": 15}
ZERO_UNITS = {"int8": 1, "int4": 16}  # zero-point units per quantization step
SCALE_DTYPE, ZERO_DTYPE = torch.float16, torch.uint8


@dataclass(frozen=True)
class KVQuant:
    """How one layer's cache holds its values (None in the kernels' `kv_quant` = as --dtype).
    scales / zeros: int8/int4's float16 scales and uint8 zero points, [2, num_blocks,
    block_size, num_kv_heads] each (contiguous, so they share strides); fp8_scales: fp8's
    per-tensor scales, float32 [2] (K's, V's); rotation: int4's [head_dim, head_dim] Hadamard
    matrix in the model's dtype, applied by the attention layer (the kernels see rotated q, k,
    v)."""
    kind: str
    scales: Optional[torch.Tensor] = None
    zeros: Optional[torch.Tensor] = None
    fp8_scales: Optional[torch.Tensor] = None
    rotation: Optional[torch.Tensor] = None

    @property
    def k_scale(self):
        return self.fp8_scales[0] if self.fp8_scales is not None else 1.0

    @property
    def v_scale(self):
        return self.fp8_scales[1] if self.fp8_scales is not None else 1.0

    @property
    def code(self) -> int:
        """The Triton kernels' KV_QUANT constant: 1 int8, 2 int4, 3 fp8."""
        return {"int8": 1, "int4": 2}.get(self.kind, 3)


def hadamard(n: int) -> torch.Tensor:
    """An orthonormal n x n float32 rotation that spreads each channel over all of them:
    Sylvester-Hadamard blocks of the largest power of two dividing n (all of n when n is one),
    on the diagonal."""
    b = n & -n
    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.block_diag(*[h / math.sqrt(b)] * (n // b))


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
    """Bytes of one K (or V) vector of one head in the cache, its scale and zero point included."""
    sdt, last = storage(kind, head_dim, dtype)
    extra = SCALE_DTYPE.itemsize + ZERO_DTYPE.itemsize if kind in LEVELS else 0
    return last * sdt.itemsize + extra


def quantize(x: torch.Tensor, kind: str, scale: float = 1.0
             ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """x [T, H, D] -> (data [T, H, D or D/2], scales [T, H] float16, zero points [T, H] uint8),
    the last two None for fp8."""
    xf = x.float()
    if kind in FP8_DTYPES:
        m = FP8_MAX[kind]
        return (xf / scale).clamp(-m, m).to(FP8_DTYPES[kind]), None, None
    levels, units = LEVELS[kind], ZERO_UNITS[kind]
    lo, hi = xf.amin(-1).clamp(max=0), xf.amax(-1).clamp(min=0)
    s = ((hi - lo) / levels).to(SCALE_DTYPE)
    sf = s.float()
    inv = torch.where(sf > 0, 1.0 / sf, torch.zeros_like(sf))
    zp = torch.floor(-lo * inv * units + 0.5).clamp(0, 255)
    q = torch.floor(xf * inv[..., None] + (zp / units)[..., None] + 0.5)
    q = q.clamp(0, levels).to(torch.uint8)
    if kind == "int4":
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, s, zp.to(ZERO_DTYPE)


def dequantize(data: torch.Tensor, scales: Optional[torch.Tensor], zeros: Optional[torch.Tensor],
               kind: str, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of quantize for any leading shape: data [..., D or D/2], scales and zeros
    [...] (unused for fp8)."""
    if kind in FP8_DTYPES:
        return (data.float() * scale).to(dtype)
    if kind == "int4":
        data = torch.stack([data & 15, data >> 4], -1).flatten(-2)
    zp = zeros.float() / ZERO_UNITS[kind]
    return ((data.float() - zp[..., None]) * scales.float()[..., None]).to(dtype)


def calibrate(kv: KVQuant, k: torch.Tensor, v: torch.Tensor) -> None:
    """--calculate-kv-scales: set an fp8 cache's K and V scales from this data, amax / the
    format's largest value (so the largest magnitude seen maps onto it), on the device, without
    a host sync."""
    amax = torch.stack([k.detach().abs().amax(), v.detach().abs().amax()]).float()
    kv.fp8_scales.copy_((amax / FP8_MAX[kv.kind]).clamp(min=1e-12))


def write_cache_torch(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, kv: KVQuant,
                      slot_mapping: torch.Tensor) -> None:
    """reshape_and_cache for a quantized cache: quantize k, v [T, H, D] and store the values
    and their scales and zero points at slot_mapping (slots < 0 skipped)."""
    nb, bs, h = kv_cache.shape[1], kv_cache.shape[2], kv_cache.shape[3]
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    flat = kv_cache.view(2, nb * bs, h, kv_cache.shape[4])
    for i, (x, sc) in enumerate(((k, kv.k_scale), (v, kv.v_scale))):
        data, scales, zeros = quantize(x, kv.kind, sc)
        if data.dtype.itemsize == 1 and data.dtype != torch.uint8:  # fp8: copy the bytes
            flat[i].view(torch.uint8).index_copy_(0, slot_mapping, data.view(torch.uint8))
        else:
            flat[i].index_copy_(0, slot_mapping, data)
        if scales is not None:
            kv.scales.view(2, nb * bs, h)[i].index_copy_(0, slot_mapping, scales)
            kv.zeros.view(2, nb * bs, h)[i].index_copy_(0, slot_mapping, zeros)


def read_blocks(kv_cache: torch.Tensor, kv: Optional[KVQuant], which: int, blocks: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """kv_cache[which][blocks] as floats of `dtype`: [*blocks.shape, block_size, H, D]. Only the
    blocks asked for are read and dequantized (the cache itself stays quantized)."""
    data = kv_cache[which][blocks]
    if kv is None:
        return data
    if kv.scales is None:
        return dequantize(data, None, None, kv.kind, kv.k_scale if which == 0 else kv.v_scale, dtype)
    return dequantize(data, kv.scales[which][blocks], kv.zeros[which][blocks], kv.kind, dtype=dtype)
