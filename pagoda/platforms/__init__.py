"""The platform an engine runs on (CPU or CUDA) and the kernels that come with it.

Chosen once per engine, by the worker, before the model is built: every layer takes its kernel
functions (`platform.ops`) when it is constructed, so two engines in one process (a test's CPU
reference beside a GPU engine, say) never share a process-wide switch.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Iterator


@dataclass(frozen=True)
class Platform:
    name: str               # "cpu" | "cuda"
    device_type: str        # torch device type
    ops: SimpleNamespace    # rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul,
                            # reshape_and_cache, paged_attention, varlen_attention; .triton (bool)


_local = threading.local()


def select_platform(device_type: str, attention_backend: str = "auto") -> Platform:
    """The platform for a device: CUDA with Triton kernels (or torch's with --attention-backend
    torch), or the CPU with pagoda's C kernels (torch references where they cannot be built)."""
    if device_type == "cuda":
        from pagoda.platforms.cuda import cuda_platform
        return cuda_platform(attention_backend)
    if attention_backend == "triton":
        raise ValueError("--attention-backend: triton needs a CUDA device; use torch on CPU")
    from pagoda.platforms.cpu import CPU
    return CPU


def current_platform() -> Platform:
    """The platform models are being built for (the CPU's outside `building_for`)."""
    p = getattr(_local, "platform", None)
    if p is None:
        from pagoda.platforms.cpu import CPU
        return CPU
    return p


@contextlib.contextmanager
def building_for(platform: Platform) -> Iterator[Platform]:
    """Layers constructed inside take `platform.ops` as their kernels."""
    prev = getattr(_local, "platform", None)
    _local.platform = platform
    try:
        yield platform
    finally:
        _local.platform = prev
