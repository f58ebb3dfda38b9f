"""Triton twin of pagoda.kernels.logprobs: one program per row reads the row once, in chunks,
keeping an online max and sum of exponentials (the log-sum-exp), the count of tokens above the
chosen one (its rank) and a running top-k list (k extractions per chunk, in registers). A tie
goes to the lower token id, as the reference's sort does for equal values."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.kernels.triton_args import aligned

BLOCK = 2048


@triton.jit(do_not_specialize=["stride", "vocab"])
def _logprobs_kernel(x_ptr, stride, chosen_ptr, ids_ptr, lps_ptr, rank_ptr, vocab,
                     K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride
    c = tl.load(chosen_ptr + row).to(tl.int64)
    xc = tl.load(base + c).to(tl.float32)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), dtype=tl.float32)
    above = tl.zeros((), dtype=tl.int32)
    kk = tl.arange(0, KP)
    slot = kk < K
    top_v = tl.where(slot, float("-inf"), float("inf"))  # pad slots never leave nor get replaced
    top_i = tl.full((KP,), 2147483647, tl.int32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        cmax = tl.max(x, 0)
        m_new = tl.maximum(m, cmax)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
        above += tl.sum((x > xc).to(tl.int32), 0)
        if cmax > tl.min(top_v, 0):  # most chunks hold nothing for the list: skip them
            for _ in tl.static_range(K):
                v = tl.max(x, 0)
                vi = tl.min(tl.where(x == v, offs, 2147483647), 0)
                low = tl.min(top_v, 0)
                # strictly above: an equal value already listed has the lower id
                pos = tl.where(v > low, tl.min(tl.where(top_v == low, kk, KP), 0), KP)
                top_v = tl.where(kk == pos, v, top_v)
                top_i = tl.where(kk == pos, vi, top_i)
                x = tl.where(offs == vi, float("-inf"), x)
    lse = m + tl.log(s)
    out = row.to(tl.int64) * (K + 1)
    tl.store(ids_ptr + out, c)
    tl.store(lps_ptr + out, xc - lse)
    tl.store(rank_ptr + row, (above + 1).to(tl.int64))
    left = slot
    for t in tl.static_range(K):  # best first; equal values by lower id
        v = tl.max(tl.where(left, top_v, float("-inf")), 0)
        i = tl.min(tl.where(left & (top_v == v), top_i, 2147483647), 0)
        tl.store(ids_ptr + out + 1 + t, i.to(tl.int64))
        tl.store(lps_ptr + out + 1 + t, v - lse)
        left = left & ((top_v != v) | (top_i != i))


def logprobs_topk_triton(logits: torch.Tensor, chosen: torch.Tensor, k: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As logprobs_topk_torch; logits [N, V] in any float dtype, last dim dense."""
    n, vocab = logits.shape
    k = min(k, vocab)
    ids = torch.empty(n, k + 1, dtype=torch.long, device=logits.device)
    lps = torch.empty(n, k + 1, dtype=torch.float32, device=logits.device)
    ranks = torch.empty(n, dtype=torch.long, device=logits.device)
    if n == 0:
        return ids, lps, ranks
    assert logits.stride(1) == 1
    _logprobs_kernel[(n,)](logits, logits.stride(0), aligned(chosen), ids, lps, ranks, vocab,
                           K=k, KP=triton.next_power_of_2(max(k, 1)), BLOCK=BLOCK, num_warps=8)
    return ids, lps, ranks
