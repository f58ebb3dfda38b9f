"""KV-cache tensors and their sizing.

One preallocated tensor per layer, [2, num_blocks, block_size, num_kv_heads, head_dim]. The number
of blocks comes from --num-gpu-blocks-override, else from a byte budget: --kv-cache-memory, or on
CUDA --gpu-memory-utilization x total memory minus what weights and a profiled max-size forward
pass use; on CPU 1 GiB by default.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger("pagoda.kv_cache")

CPU_DEFAULT_KV_BYTES = 1 << 30


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                      head_dim: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    if torch.device(device).type == "cpu":
        return [_lazy_zeros(shape, dtype) for _ in range(num_layers)]
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]


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
