"""--kv-cache-dtype as a format of the attention layers' caches: what each layer's tensors are
(data + the int8/int4 scales and zero points beside it, or fp8 with per-tensor scales), their bytes
per block for the memory plan, and their allocation. The kernels that write and read them are in
pagoda/kernels/kv_quant.py (torch) and attention_triton.py (Triton)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from pagoda.kernels.kv_quant import (LEVELS, SCALE_DTYPE, ZERO_DTYPE, KVQuant,
                                      bytes_per_token_head, hadamard, storage)


@dataclass(frozen=True)
class KVCacheFormat:
    kv_cache_dtype: str          # the flag's value: auto | int8 | int4 | fp8_e4m3 | fp8_e5m2
    dtype: torch.dtype           # the model's
    num_kv_heads: int
    head_dim: int
    k_scale: float = 1.0         # fp8's per-tensor scales (until measured)
    v_scale: float = 1.0

    @property
    def kind(self) -> Optional[str]:
        return None if self.kv_cache_dtype == "auto" else self.kv_cache_dtype

    def block_bytes(self, num_layers: int, block_size: int) -> int:
        """K and V of every layer for one block, scales and zero points included."""
        return 2 * num_layers * block_size * self.num_kv_heads * bytes_per_token_head(
            self.kind, self.head_dim, self.dtype)

    def capacity_vs(self, baseline: torch.dtype) -> float:
        """Tokens this format holds per token of a `baseline`-dtype cache in the same memory."""
        return (self.head_dim * baseline.itemsize
                / bytes_per_token_head(self.kind, self.head_dim, self.dtype))

    def allocate(self, num_layers: int, num_blocks: int, block_size: int,
                 zeros: Callable[[tuple, torch.dtype], torch.Tensor]
                 ) -> list[tuple[torch.Tensor, Optional[KVQuant]]]:
        """One (data, format) per layer; `zeros(shape, dtype)` makes a zeroed tensor."""
        sdt, last = storage(self.kind, self.head_dim, self.dtype)
        rotation = None
        if self.kind == "int4":  # one for every layer
            rotation = zeros((self.head_dim, self.head_dim), self.dtype)
            rotation.copy_(hadamard(self.head_dim))
        out = []
        for _ in range(num_layers):
            data = zeros((2, num_blocks, block_size, self.num_kv_heads, last), sdt)
            quant = None
            if self.kind in LEVELS:
                shape = (2, num_blocks, block_size, self.num_kv_heads)
                quant = KVQuant(self.kind, zeros(shape, SCALE_DTYPE), zeros(shape, ZERO_DTYPE),
                                rotation=rotation)
            elif self.kind is not None:
                fp8 = zeros((2,), torch.float32)
                fp8[0], fp8[1] = self.k_scale, self.v_scale
                quant = KVQuant(self.kind, fp8_scales=fp8)
            out.append((data, quant))
        return out
