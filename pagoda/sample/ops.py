"""The sampler's batched operations on the device: token masks, logit bias, penalties, the row
sampler (min-p / top-k / top-p) and logprobs. Each works on all the rows that need it at once,
addressed by index tensors; none reads anything back to the host. The penalties and the row
sampler run as Triton kernels on CUDA, as C kernels on the CPU (pagoda.kernels.cpu_sampling),
and as their torch twins (pagoda.kernels.sampling) where neither is available.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import numpy as np
import torch

from pagoda.kernels.cpu_sampling import apply_penalties_cpu, sample_rows_cpu
from pagoda.kernels.logprobs import logprobs_topk_torch
from pagoda.kernels.sampling import apply_penalties_torch, sample_rows_torch
from pagoda.sample.logprobs import LogprobsTensors


@functools.cache
def _triton():
    """The Triton kernels module, or None without a triton wheel; imported with the first CUDA
    batch (importing triton costs a CPU-only start ~0.1 s)."""
    try:
        from pagoda.kernels import sampling_triton
    except ImportError:
        return None
    return sampling_triton


@contextmanager
def one_thread_on_cpu(t: torch.Tensor):
    """Run the sampler's torch ops on one CPU thread. Its tensors are small (rows x vocab): a
    second thread saves little, and each op's OpenMP fork/join, on a 2-core machine that is busy
    with anything else, can cost tens of milliseconds."""
    n = torch.get_num_threads()
    if t.is_cuda or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list or numpy array on the device without a stream sync (a plain
    torch.tensor(..., device=cuda) copies from pageable memory and waits for the GPU, which would
    stall an overlapped step)."""
    t = torch.tensor(values, dtype=dtype)  # a numpy array is copied in one go (never aliased)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def add_logit_bias_(logits: torch.Tensor, batch_rows: torch.Tensor, ids: torch.Tensor,
                    values: torch.Tensor) -> None:
    """logits[batch_rows[i], ids[i, j]] += values[i, j] (padding: id 0 with value 0)."""
    logits.index_put_((batch_rows[:, None].expand_as(ids), ids), values, accumulate=True)


def forbid_tokens_(logits: torch.Tensor, batch_rows: torch.Tensor, ids: torch.Tensor) -> None:
    """logits[batch_rows[i], ids[i, j]] = -inf (rows padded by repeating one of their ids)."""
    logits.index_put_((batch_rows[:, None].expand_as(ids), ids),
                      torch.full(ids.shape, float("-inf"), dtype=logits.dtype, device=logits.device))


def apply_penalties_(logits: torch.Tensor, token_state: torch.Tensor, batch_rows: torch.Tensor,
                     state_rows: torch.Tensor, repetition: torch.Tensor, frequency: torch.Tensor,
                     presence: torch.Tensor) -> None:
    if not logits.is_cuda:
        fn = apply_penalties_cpu
    else:
        fn = _triton().apply_penalties_triton if _triton() else apply_penalties_torch
    fn(logits, token_state, batch_rows, state_rows, repetition, frequency, presence)


def sample_rows(vals: torch.Tensor, index: torch.Tensor, width: torch.Tensor, inv_temp: torch.Tensor,
                min_p: torch.Tensor, top_p: torch.Tensor, seed: torch.Tensor, position: torch.Tensor,
                seed_host: np.ndarray, position_host: np.ndarray, use_top_p: bool,
                use_min_p: bool) -> torch.Tensor:
    """The column drawn in each row vals[index] (see pagoda.kernels.sampling). The Triton kernel
    takes the Philox keys and counters from the device, its torch twin from the host."""
    if vals.is_cuda and _triton():
        return _triton().sample_rows_triton(vals, index, width, inv_temp, min_p, top_p, seed,
                                            position, use_top_p=use_top_p, use_min_p=use_min_p)
    fn = sample_rows_cpu if not vals.is_cuda else sample_rows_torch
    return fn(vals, index, width, inv_temp, min_p, top_p, seed_host, position_host,
                             use_top_p=use_top_p, use_min_p=use_min_p)


def logprobs_topk(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> LogprobsTensors:
    """Per row: the chosen token's logprob and rank (1 + the tokens strictly more likely), then
    the k most likely tokens' ids and logprobs, from fp32 log-softmax of `logits` [N, V]
    (kernels/logprobs.py; one pass of a Triton kernel per row on CUDA)."""
    if logits.is_cuda and _triton() and logits.stride(1) == 1:
        from pagoda.kernels.logprobs_triton import logprobs_topk_triton
        return LogprobsTensors(*logprobs_topk_triton(logits, chosen, k))
    return LogprobsTensors(*logprobs_topk_torch(logits, chosen, k))


def token_counts_add_(token_state: torch.Tensor, state_rows: torch.Tensor,
                      tokens: torch.Tensor) -> None:
    """One more occurrence of tokens[i] in row state_rows[i] (rows are distinct)."""
    token_state.index_put_((state_rows, tokens), torch.ones_like(tokens, dtype=token_state.dtype),
                           accumulate=True)

