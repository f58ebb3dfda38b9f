"""Python entry points of cpu_sampling.c: the row sampler and the penalties for float32 CPU
tensors, each falling back to its torch reference (sampling.py) for other dtypes or where the C
kernels cannot be built."""
from __future__ import annotations

import ctypes

import numpy as np
import torch

from pagoda.kernels import cpu_build
from pagoda.kernels.sampling import MAX_ROUNDS, apply_penalties_torch, sample_rows_torch

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
_SIGNATURES = {
    "pagoda_sample_rows": [_P, _I64, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I32, _I32, _P],
    "pagoda_penalties": [_P, _I64, _P, _I64, _P, _P, _P, _P, _P, _I64, _I64],
}


def _lib():
    return cpu_build.load("cpu_sampling", _SIGNATURES)


def _c(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).contiguous()


def sample_rows_cpu(vals: torch.Tensor, index: torch.Tensor, width: torch.Tensor,
                    inv_temp: torch.Tensor, min_p: torch.Tensor, top_p: torch.Tensor,
                    seed: np.ndarray, position: np.ndarray, *, use_top_p: bool = True,
                    use_min_p: bool = True) -> torch.Tensor:
    """As sample_rows_torch (same arguments)."""
    if vals.device.type != "cpu" or vals.dtype != torch.float32 or vals.stride(1) != 1 or _lib() is None:
        return sample_rows_torch(vals, index, width, inv_temp, min_p, top_p, seed, position,
                                 use_top_p=use_top_p, use_min_p=use_min_p)
    n = index.numel()
    out = torch.empty(n, dtype=torch.long)
    if n == 0:
        return out
    index, width = _c(index, torch.long), _c(width, torch.long)
    inv_temp, min_p, top_p = _c(inv_temp, torch.float32), _c(min_p, torch.float32), _c(top_p, torch.float32)
    if not use_min_p:
        min_p = torch.zeros_like(min_p)
    seed = np.ascontiguousarray(seed, dtype=np.uint64)
    position = np.ascontiguousarray(position, dtype=np.int64)
    _lib().pagoda_sample_rows(vals.data_ptr(), vals.stride(0), index.data_ptr(), width.data_ptr(),
                              inv_temp.data_ptr(), min_p.data_ptr(), top_p.data_ptr(),
                              seed.ctypes.data, position.ctypes.data, n, int(width.max()),
                              int(use_top_p), MAX_ROUNDS, out.data_ptr())
    return out


def apply_penalties_cpu(logits: torch.Tensor, token_state: torch.Tensor, batch_rows: torch.Tensor,
                        state_rows: torch.Tensor, repetition: torch.Tensor, frequency: torch.Tensor,
                        presence: torch.Tensor) -> None:
    """As apply_penalties_torch: in place, one pass over the penalised rows."""
    if (logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.stride(1) != 1
            or token_state.stride(1) != 1 or _lib() is None):
        return apply_penalties_torch(logits, token_state, batch_rows, state_rows, repetition,
                                     frequency, presence)
    b, s = _c(batch_rows, torch.long), _c(state_rows, torch.long)
    rep, freq, pres = (_c(t, torch.float32) for t in (repetition, frequency, presence))
    _lib().pagoda_penalties(logits.data_ptr(), logits.stride(0), token_state.data_ptr(),
                            token_state.stride(0), b.data_ptr(), s.data_ptr(), rep.data_ptr(),
                            freq.data_ptr(), pres.data_ptr(), b.numel(), logits.shape[1])
