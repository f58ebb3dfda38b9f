"""KV-cache tensors and their sizing.

One preallocated tensor per layer, [2, num_blocks, block_size, num_kv_heads, head_dim] (with
--kv-cache-dtype int8/int4/fp8: the quantized values, and for int8/int4 a float16 scale and a
uint8 zero point per token and head beside them; layers/quantization/kv_cache.py). The number
of blocks comes from --num-gpu-blocks-override, else from a byte budget: --kv-cache-memory, or on
CUDA --gpu-memory-utilization x total memory minus what weights and a profiled max-size forward
pass use; on CPU 1 GiB by default.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from pagoda.kernels.kv_quant import KVQuant
from pagoda.layers.quantization.kv_cache import KVCacheFormat

logger = logging.getLogger("pagoda.kv_cache")

CPU_DEFAULT_KV_BYTES = 1 << 30


def allocate_kv_cache(fmt: KVCacheFormat, num_layers: int, num_blocks: int, block_size: int,
                      device) -> list[tuple[torch.Tensor, Optional[KVQuant]]]:
    """Per layer: the cache tensor and, for a quantized cache, how it holds its values."""
    if torch.device(device).type == "cpu":
        return fmt.allocate(num_layers, num_blocks, block_size, _lazy_zeros)
    return fmt.allocate(num_layers, num_blocks, block_size,
                        lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=device))


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros whose pages the OS hands out (already zero) as they are first written: numpy's
    zeros is calloc, which maps fresh pages for a large block, where torch.zeros writes all of
    them at once (1 GiB by default: ~1 s of start-up on this 2-core machine)."""
    import numpy as np
    n = 1
    for d in shape:
        n *= d
    nbytes = n * torch.empty(0, dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def check_fits(num_blocks: int, block_size: int, max_model_len: int, on_cuda: bool) -> None:
    """Refuse to start when not even one max-length request fits, naming the flag to change."""
    need = -(-max_model_len // block_size)
    if num_blocks < need:
        knob = ("--gpu-memory-utilization (raise it) or --max-model-len (lower it)" if on_cuda
                else "--kv-cache-memory (raise it) or --max-model-len (lower it)")
        raise ValueError(f"KV cache too small: {num_blocks} blocks x {block_size} tokens = "
                         f"{num_blocks * block_size} tokens, but one request of --max-model-len "
                         f"{max_model_len} needs {need} blocks; change {knob}")
