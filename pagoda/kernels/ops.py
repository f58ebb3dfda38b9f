"""The kernel entry points the model layers call.

By default: the C kernels (cpu_*.c) for float32 CPU tensors, each falling back to its torch
reference otherwise. `use_triton(True)` (the model runner does this on CUDA with the triton
attention backend) switches to the Triton kernels in pagoda.kernels.dispatch.
"""
from __future__ import annotations

from pagoda.kernels.attention import reshape_and_cache_torch
from pagoda.kernels.cpu_attention import paged_attention_cpu
from pagoda.kernels.cpu_fused import (fused_add_rms_norm_cpu, rms_norm_cpu, rotary_embedding_cpu,
                                      silu_and_mul_cpu)

rms_norm = rms_norm_cpu
fused_add_rms_norm = fused_add_rms_norm_cpu
rotary_embedding = rotary_embedding_cpu
silu_and_mul = silu_and_mul_cpu
reshape_and_cache = reshape_and_cache_torch
paged_attention = paged_attention_cpu
triton_enabled = False


def use_triton(enable: bool) -> None:
    global rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul, reshape_and_cache
    global paged_attention, triton_enabled
    if enable:
        from pagoda.kernels import dispatch as d
        rms_norm, fused_add_rms_norm = d.rms_norm, d.fused_add_rms_norm
        rotary_embedding, silu_and_mul = d.rotary_embedding, d.silu_and_mul
        reshape_and_cache, paged_attention = d.reshape_and_cache, d.paged_attention
    else:
        rms_norm, fused_add_rms_norm = rms_norm_cpu, fused_add_rms_norm_cpu
        rotary_embedding, silu_and_mul = rotary_embedding_cpu, silu_and_mul_cpu
        reshape_and_cache, paged_attention = reshape_and_cache_torch, paged_attention_cpu
    triton_enabled = enable
