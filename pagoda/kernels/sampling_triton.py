"""Triton twins of pagoda.kernels.sampling: the row sampler (rejection sampling for min-p /
top-p without a sort, one program per row, no host sync) and the fused penalties.

The row sampler reads each row once for plain temperature (the race), three times for top-p
(max, race with the min-p set's mass, the mass above the drawn token); the logits may stay in the
model's dtype. The race noise comes from triton.language's Philox with the torch twin's key and
counter, four tokens per Philox call, so both draw the same token from the same row (up to the
last bit of exp and log).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.random import philox

from pagoda.kernels.sampling import CHUNK, COUNT_MASK, MAX_ROUNDS
from pagoda.kernels.triton_args import aligned


@triton.jit
def _row_x(base, offs, width, inv_t):
    return tl.load(base + offs, mask=offs < width, other=float("-inf")).to(tl.float32) * inv_t


@triton.jit
def _row_mass(base, width, inv_t, m, lo, gt, BLOCK: tl.constexpr):
    """Mass of the tokens with x >= lo and x > gt: fp32 within a chunk, fp64 across chunks."""
    acc = tl.zeros((), dtype=tl.float64)
    for start in range(0, width, BLOCK):
        x = _row_x(base, start + tl.arange(0, BLOCK), width, inv_t)
        e = tl.where((x >= lo) & (x > gt), tl.exp(x - m), 0.0)
        acc += tl.sum(e, 0).to(tl.float64)
    return acc


@triton.jit
def _log_exp_noise(bits):
    """log(E), E ~ Exp(1), from 32 random bits (as race_noise in sampling.py)."""
    v = bits.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
    series = v * (1 + v * (0.5 + v * (0.3333333432674408 + v * 0.25)))
    return tl.log(tl.where(v < 0.015625, series, -tl.log(1 - v)))


@triton.jit
def _race(base, width, inv_t, lo, piv, seed, p_lo, p_hi, rnd, BLOCK: tl.constexpr):
    """argmax of x - log(E) over {x >= lo} & {x > piv}; the first index of a tie."""
    G: tl.constexpr = BLOCK // 4
    g = tl.arange(0, G)
    w = tl.arange(0, 4)
    best = tl.full((), float("-inf"), tl.float32)
    pick = tl.zeros((), dtype=tl.int32)
    for start in range(0, width, BLOCK):
        offs = start + 4 * g[:, None] + w[None, :]          # [G, 4]: a contiguous chunk
        x = _row_x(base, offs, width, inv_t)
        grp = ((start // 4) + g).to(tl.uint32)
        r0, r1, r2, r3 = philox(seed, grp, p_lo + grp * 0, p_hi + grp * 0, rnd + grp * 0)
        bits = tl.where(w[None, :] == 0, r0[:, None], tl.where(w[None, :] == 1, r1[:, None],
                        tl.where(w[None, :] == 2, r2[:, None], r3[:, None])))
        score = tl.where((x >= lo) & (x > piv), x - _log_exp_noise(bits), float("-inf"))
        # max and first index of it on the [G, 4] tile itself: compiled Triton (3.6, H200) gave
        # indices past the row from argmax over the tile reshaped to 1-D (the interpreter did not)
        cmax = tl.max(tl.max(score, 1), 0)
        if cmax > best:
            best = cmax
            pick = tl.min(tl.min(tl.where(score == cmax, offs, 2147483647), 1), 0)
    return pick


@triton.jit(do_not_specialize=["stride"])
def _sample_rows_kernel(vals, stride, index, width_ptr, inv_temp_ptr, min_p_ptr, top_p_ptr,
                        seed_ptr, pos_ptr, out_ptr, BLOCK: tl.constexpr, USE_TOP_P: tl.constexpr,
                        USE_MIN_P: tl.constexpr, MAX_R: tl.constexpr):
    pid = tl.program_id(0)
    base = vals + tl.load(index + pid).to(tl.int64) * stride
    width = tl.load(width_ptr + pid).to(tl.int32)
    inv_t = tl.load(inv_temp_ptr + pid)
    seed = tl.load(seed_ptr + pid)
    pos = tl.load(pos_ptr + pid)
    p_lo = (pos & 0xFFFFFFFF).to(tl.uint32)
    p_hi = ((pos >> 32) & 0xFFFFFFFF).to(tl.uint32)
    m = tl.zeros((), dtype=tl.float32)
    lo = float("-inf")
    if USE_MIN_P or USE_TOP_P:
        mx = tl.full((BLOCK,), float("-inf"), tl.float32)
        for start in range(0, width, BLOCK):
            mx = tl.maximum(mx, _row_x(base, start + tl.arange(0, BLOCK), width, inv_t))
        m = tl.max(mx, 0)
        m = tl.where(m > float("-inf"), m, 0.0)  # a row with nothing to draw gives column 0
    if USE_MIN_P:
        mp = tl.load(min_p_ptr + pid)
        lo = tl.where(mp > 0, m + tl.log(tl.maximum(mp, 1e-30)), float("-inf"))
    piv = tl.full((), float("-inf"), tl.float32)
    j = _race(base, width, inv_t, lo, piv, seed, p_lo, p_hi, tl.zeros((), dtype=tl.uint32), BLOCK)
    if USE_TOP_P:
        top_p = tl.load(top_p_ptr + pid).to(tl.float64)
        if top_p < 1.0:
            z0 = _row_mass(base, width, inv_t, m, lo, float("-inf"), BLOCK)
            rnd = tl.zeros((), dtype=tl.int32)
            done = tl.zeros((), dtype=tl.int32)
            while done == 0:
                xj = tl.load(base + j).to(tl.float32) * inv_t
                better = _row_mass(base, width, inv_t, m, lo, xj, BLOCK)
                if (better < top_p * z0) | (better == 0.0) | (rnd >= MAX_R - 1):  # the best stays
                    done = 1
                else:  # every token no more likely than the draw is outside the top-p set
                    piv = xj
                    rnd += 1
                    j = _race(base, width, inv_t, lo, piv, seed, p_lo, p_hi, rnd.to(tl.uint32), BLOCK)
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
    f32 = torch.float32
    _sample_rows_kernel[(n,)](vals, vals.stride(0), aligned(index), aligned(width),
                              aligned(inv_temp, f32), aligned(min_p, f32), aligned(top_p, f32),
                              aligned(seed), aligned(position), out,
                              BLOCK=CHUNK, USE_TOP_P=use_top_p, USE_MIN_P=use_min_p,
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
        logits, logits.stride(0), token_state, token_state.stride(0), aligned(batch_rows),
        aligned(state_rows), aligned(repetition, torch.float32), aligned(frequency, torch.float32),
        aligned(presence, torch.float32),
        vocab, BLOCK=block, MASK=COUNT_MASK, num_warps=4,
        enable_fp_fusion=False)  # no FMA: the torch twin's roundings exactly
