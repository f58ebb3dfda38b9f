"""Triton twins of pagoda.kernels.sampling: the row sampler (rejection sampling for min-p /
top-p without a sort, one program per row, no host sync) and the fused penalties.

The row sampler reads each row a few times (max, mass, the draw's scan until it lands, and for
top-p the mass above the drawn token); the logits may stay in the model's dtype. The uniform of
each round comes from triton.language's Philox with the key and counter of the torch twin, so
both draw the same token from the same row (up to the last bit of exp and log).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.random import philox

from pagoda.kernels.sampling import CHUNK, COUNT_MASK, MAX_ROUNDS


@triton.jit
def _row_x(base, offs, width, inv_t):
    return tl.load(base + offs, mask=offs < width, other=float("-inf")).to(tl.float32) * inv_t


@triton.jit
def _row_e(base, offs, width, inv_t, m, lo, gt):
    """x and exp(x - m) of one chunk, zero outside {x >= lo} & {x > gt}."""
    x = _row_x(base, offs, width, inv_t)
    return tl.where((x >= lo) & (x > gt), tl.exp(x - m), 0.0)


@triton.jit
def _row_mass(base, width, inv_t, m, lo, gt, BLOCK: tl.constexpr):
    acc = tl.zeros((), dtype=tl.float64)
    for start in range(0, width, BLOCK):
        e = _row_e(base, start + tl.arange(0, BLOCK), width, inv_t, m, lo, gt)
        acc += tl.sum(e, 0).to(tl.float64)
    return acc


@triton.jit
def _sample_rows_kernel(vals, stride, index, width_ptr, inv_temp_ptr, min_p_ptr, top_p_ptr,
                        seed_ptr, pos_ptr, out_ptr, BLOCK: tl.constexpr, USE_TOP_P: tl.constexpr,
                        USE_MIN_P: tl.constexpr, MAX_R: tl.constexpr):
    pid = tl.program_id(0)
    base = vals + tl.load(index + pid).to(tl.int64) * stride
    width = tl.load(width_ptr + pid).to(tl.int32)
    inv_t = tl.load(inv_temp_ptr + pid)
    ar = tl.arange(0, BLOCK)
    mx = tl.full((BLOCK,), float("-inf"), tl.float32)
    for start in range(0, width, BLOCK):
        mx = tl.maximum(mx, _row_x(base, start + ar, width, inv_t))
    m = tl.max(mx, 0)
    m = tl.where(m > float("-inf"), m, 0.0)  # a row with nothing to draw gives column 0
    lo = float("-inf")
    if USE_MIN_P:
        mp = tl.load(min_p_ptr + pid)
        lo = tl.where(mp > 0, m + tl.log(tl.maximum(mp, 1e-30)), float("-inf"))
    z0 = _row_mass(base, width, inv_t, m, lo, float("-inf"), BLOCK)
    top_p = tl.load(top_p_ptr + pid).to(tl.float64)
    seed = tl.load(seed_ptr + pid)
    pos = tl.load(pos_ptr + pid)
    c0 = (pos & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((pos >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = c0 * 0
    zs = z0
    piv = tl.full((), float("-inf"), tl.float32)
    rnd = tl.zeros((), dtype=tl.int32)
    done = tl.zeros((), dtype=tl.int32)
    j = tl.zeros((), dtype=tl.int32)
    while done == 0:
        r0, r1, _, _ = philox(seed, c0, c1, rnd.to(tl.uint32), zero)
        u = ((r0 >> 5).to(tl.float64) * 67108864.0 + (r1 >> 6).to(tl.float64)) * (1.0 / 9007199254740992.0)
        target = u * zs
        # inverse transform: chunk sums find the chunk, a cumsum the token in it
        pre = tl.zeros((), dtype=tl.float64)
        j = tl.full((), -1, tl.int32)
        last = tl.full((), -1, tl.int32)
        start = 0
        while (j < 0) & (start < width):
            offs = start + ar
            e = _row_e(base, offs, width, inv_t, m, lo, piv)
            s = tl.sum(e, 0).to(tl.float64)
            nz = tl.max(tl.where(e > 0, offs, -1), 0)
            if pre + s > target:
                cs = tl.cumsum(e, 0)
                t = (target - pre).to(tl.float32)
                first = tl.min(tl.where((cs > t) & (e > 0), offs, 2147483647), 0)
                j = tl.where(first < 2147483647, first, nz)
            else:
                pre += s
                last = tl.maximum(last, nz)
            start += BLOCK
        j = tl.where(j < 0, last, j)
        j = tl.maximum(j, 0)
        if USE_TOP_P:
            xj = tl.load(base + j).to(tl.float32) * inv_t
            better = _row_mass(base, width, inv_t, m, lo, xj, BLOCK)
            if (top_p >= 1.0) | (better < top_p * z0) | (rnd >= MAX_R - 1):
                done = 1
            else:
                piv = xj
                zs = better
                rnd += 1
        else:
            done = 1
    tl.store(out_ptr + pid, j.to(tl.int64))


def sample_rows_triton(vals: torch.Tensor, index: torch.Tensor, width: torch.Tensor,
                       inv_temp: torch.Tensor, min_p: torch.Tensor, top_p: torch.Tensor,
                       seed: torch.Tensor, position: torch.Tensor, *, use_top_p: bool = True,
                       use_min_p: bool = True) -> torch.Tensor:
    """As sample_rows_torch, with seed (int64, the seed's bits) and position (int64) on the
    device instead of the host."""
    n = index.numel()
    out = torch.empty(n, dtype=torch.long, device=vals.device)
    if n == 0:
        return out
    assert vals.stride(1) == 1
    _sample_rows_kernel[(n,)](vals, vals.stride(0), index, width, inv_temp.float().contiguous(),
                              min_p.float().contiguous(), top_p.float().contiguous(), seed, position,
                              out, BLOCK=CHUNK, USE_TOP_P=use_top_p, USE_MIN_P=use_min_p,
                              MAX_R=MAX_ROUNDS, num_warps=8)
    return out


@triton.jit
def _penalties_kernel(logits, l_stride, state, s_stride, batch_rows, state_rows, rep_ptr,
                      freq_ptr, pres_ptr, vocab, BLOCK: tl.constexpr, MASK: tl.constexpr):
    r = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < vocab
    lp = logits + tl.load(batch_rows + r).to(tl.int64) * l_stride + offs
    st = tl.load(state + tl.load(state_rows + r).to(tl.int64) * s_stride + offs, mask=ok, other=0)
    x = tl.load(lp, mask=ok, other=0.0)
    rep = tl.load(rep_ptr + r)
    cnt = (st & MASK).to(tl.float32)
    x = tl.where(st != 0, tl.where(x > 0, tl.math.div_rn(x, rep), x * rep), x)
    x = x - tl.load(freq_ptr + r) * cnt - tl.load(pres_ptr + r) * (cnt > 0).to(tl.float32)
    tl.store(lp, x, mask=ok)


def apply_penalties_triton(logits: torch.Tensor, token_state: torch.Tensor, batch_rows: torch.Tensor,
                           state_rows: torch.Tensor, repetition: torch.Tensor, frequency: torch.Tensor,
                           presence: torch.Tensor) -> None:
    """As apply_penalties_torch: one pass over the penalised rows' logits and token counts."""
    n, vocab = batch_rows.numel(), logits.shape[1]
    if n == 0:
        return
    assert logits.dtype == torch.float32 and logits.stride(1) == 1 and token_state.stride(1) == 1
    block = 1024
    _penalties_kernel[(n, triton.cdiv(vocab, block))](
        logits, logits.stride(0), token_state, token_state.stride(0), batch_rows, state_rows,
        repetition.float().contiguous(), frequency.float().contiguous(), presence.float().contiguous(),
        vocab, BLOCK=block, MASK=COUNT_MASK, num_warps=4)
