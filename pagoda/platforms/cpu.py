"""The CPU platform: pagoda's C kernels (cpu_*.c) for float32, each falling back to its torch
reference for other dtypes or where the kernel cannot be built."""
from __future__ import annotations

from types import SimpleNamespace

from pagoda.kernels.attention import reshape_and_cache_torch, varlen_attention_torch
from pagoda.kernels.cpu_attention import paged_attention_cpu
from pagoda.kernels.cpu_fused import (fused_add_rms_norm_cpu, rms_norm_cpu, rotary_embedding_cpu,
                                      silu_and_mul_cpu)
from pagoda.platforms import Platform

CPU = Platform("cpu", "cpu", SimpleNamespace(
    rms_norm=rms_norm_cpu, fused_add_rms_norm=fused_add_rms_norm_cpu,
    rotary_embedding=rotary_embedding_cpu, silu_and_mul=silu_and_mul_cpu,
    reshape_and_cache=reshape_and_cache_torch, paged_attention=paged_attention_cpu,
    varlen_attention=varlen_attention_torch, triton=False))
