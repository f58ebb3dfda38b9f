"""The CUDA platform: Triton kernels (pagoda.kernels.dispatch picks Triton for CUDA tensors),
or with --attention-backend torch the torch references everywhere."""
from __future__ import annotations

from types import SimpleNamespace

from pagoda.platforms import Platform


def cuda_platform(attention_backend: str) -> Platform:
    from pagoda.kernels import dispatch as d
    from pagoda.kernels.activation import silu_and_mul_torch
    from pagoda.kernels.attention import (paged_attention_torch, reshape_and_cache_torch,
                                          varlen_attention_torch)
    from pagoda.kernels.norm import fused_add_rms_norm_torch, rms_norm_torch
    from pagoda.kernels.rotary import rotary_embedding_torch
    if attention_backend == "torch" or not d.HAS_TRITON:
        return Platform("cuda", "cuda", SimpleNamespace(
            rms_norm=rms_norm_torch, fused_add_rms_norm=fused_add_rms_norm_torch,
            rotary_embedding=rotary_embedding_torch, silu_and_mul=silu_and_mul_torch,
            reshape_and_cache=reshape_and_cache_torch, paged_attention=paged_attention_torch,
            varlen_attention=varlen_attention_torch, triton=False))
    return Platform("cuda", "cuda", SimpleNamespace(
        rms_norm=d.rms_norm, fused_add_rms_norm=d.fused_add_rms_norm,
        rotary_embedding=d.rotary_embedding, silu_and_mul=d.silu_and_mul,
        reshape_and_cache=d.reshape_and_cache, paged_attention=d.paged_attention,
        varlen_attention=varlen_attention_torch, triton=True))
