"""Token sampling kernels, torch references: the row sampler and the penalties.

The row sampler draws one token per row from softmax(x / T) restricted to the min-p, top-k and
top-p sets (vLLM's order: min-p on the whole distribution, then top-k, then top-p over what is
left), without sorting the vocabulary. It is exact rejection sampling in the style of FlashInfer's
sampling kernels:

1. draw j by inverse transform from the current support S (at first: the min-p set), with
   one uniform per round from Philox keyed by the request's seed and counted by its output
   position and the round: u = Philox4x32-10(key=seed, counter=(position, round)). The draw
   depends on nothing but the row itself, so seeded requests are reproducible and
   independent of their batch neighbours;
2. j is in the top-p set exactly when the mass of the tokens strictly more likely than j is
   below top_p (of the min-p set's mass): accept it;
3. otherwise every token no more likely than j is outside the set too: S = {x > x_j}, go to 1.

Conditional on acceptance the token is distributed as softmax over the top-p set, whatever
the rounds before did, so the result equals the reference definition (`reference_probs`);
rejections are rare (round 1 accepts with probability >= top_p). Top-k is handled by the
caller: rows with top-k pass only their k best logits (a torch.topk) as the row. Tokens tied
with the boundary token are all kept (a threshold on the probability, unlike a sort, which
keeps an arbitrary subset of a tie).

Masses are fp32 sums within a chunk, fp64 across chunks; the draw's target is scaled by a total
summed the way the draw scans, so it always lands on a token of the support.
`pagoda.kernels.sampling_triton` runs the same algorithm, one program per row, with no host
sync; this torch twin syncs once per round (`.any()`), which costs nothing on the CPU.
"""
from __future__ import annotations

import numpy as np
import torch

GREEDY_EPS = 1e-5   # temperatures below this mean greedy (as SamplingParams.greedy)
MAX_ROUNDS = 256    # a row still rejected after this many rounds (NaN logits) takes its last draw
# token_state: per (row, token) the number of times the token was generated, plus this bit when
# the token is in the prompt (repetition penalty looks at prompt and output tokens)
PROMPT_BIT = 1 << 30
COUNT_MASK = PROMPT_BIT - 1
CHUNK = 2048        # the Triton kernel's chunk; the torch twin sums chunk by chunk the same way

_M32 = np.uint64(0xFFFFFFFF)
_KEY_A, _KEY_B = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_ROUND_A, _ROUND_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)


def philox_uniform(seed: np.ndarray, position: np.ndarray, rnd: int | np.ndarray) -> np.ndarray:
    """float64 uniforms in [0, 1) (53 bits), one per element: Philox4x32-10 with key = the 64-bit
    seed and counter = (position low, position high, round, 0), as triton.language.philox
    computes it; the first two output words make the 53 bits."""
    seed = np.asarray(seed).astype(np.uint64)
    pos = np.asarray(position).astype(np.int64).view(np.uint64)
    k0, k1 = seed & _M32, seed >> np.uint64(32)
    c0, c1 = pos & _M32, pos >> np.uint64(32)
    c2 = np.broadcast_to(np.asarray(rnd, dtype=np.uint64), c0.shape) & _M32
    c3 = np.zeros_like(c0)
    with np.errstate(over="ignore"):
        for _ in range(10):
            p0, p2 = _ROUND_A * c0, _ROUND_B * c2   # exact: both factors < 2**32
            c0, c2, c1, c3 = ((p2 >> np.uint64(32)) ^ c1 ^ k0, (p0 >> np.uint64(32)) ^ c3 ^ k1,
                              p2 & _M32, p0 & _M32)
            k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return ((c0 >> np.uint64(5)).astype(np.float64) * 67108864.0
            + (c1 >> np.uint64(6)).astype(np.float64)) * (1.0 / 9007199254740992.0)


def _chunked_mass(e: torch.Tensor) -> torch.Tensor:
    """Row sums of e [N, W] (fp32, >= 0): fp32 within CHUNK-wide chunks, fp64 across them."""
    n, w = e.shape
    if w <= CHUNK:
        return e.sum(-1).double()
    pad = (-w) % CHUNK
    if pad:
        e = torch.nn.functional.pad(e, (0, pad))
    return e.view(n, -1, CHUNK).sum(-1).double().sum(-1)


def sample_rows_torch(vals: torch.Tensor, index: torch.Tensor, width: torch.Tensor,
                      inv_temp: torch.Tensor, min_p: torch.Tensor, top_p: torch.Tensor,
                      seed: np.ndarray, position: np.ndarray, *, use_top_p: bool = True,
                      use_min_p: bool = True) -> torch.Tensor:
    """Column drawn in each of the rows vals[index] (int64 [N]); see the module docstring.

    vals: [*, W] logits (any float dtype); index: int64 [N] rows of vals; width: int [N], only
    the first width[i] columns of a row count; inv_temp, min_p (0 = off), top_p (1 = off):
    float32 [N]; seed (uint64) and position (int64): host arrays [N], the Philox key and counter.
    use_top_p / use_min_p = False promise that no row uses that filter (skips its work).
    """
    x = vals.index_select(0, index).float() * inv_temp[:, None]
    n, w = x.shape
    cols = torch.arange(w, device=x.device)
    x = x.masked_fill(cols[None, :] >= width[:, None], float("-inf"))
    m = x.amax(-1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))   # rows with nothing to draw
    lo = torch.full_like(m, float("-inf"))
    if use_min_p:
        lo = torch.where(min_p > 0, m + torch.log(min_p.clamp_min(1e-30)), lo)
    e = torch.where(x >= lo[:, None], torch.exp(x - m[:, None]), torch.zeros_like(x))
    z0 = _chunked_mass(e)
    piv = torch.full_like(m, float("-inf"))
    tok = torch.zeros(n, dtype=torch.long, device=x.device)
    todo = torch.arange(n, device=x.device)
    seed, position = np.asarray(seed), np.asarray(position)
    for rnd in range(MAX_ROUNDS):
        sel = todo.cpu().numpy()
        u = torch.from_numpy(philox_uniform(seed[sel], position[sel], rnd)).to(x.device)
        xs, es = x[todo], e[todo]
        es = torch.where(xs > piv[todo, None], es, torch.zeros_like(es))
        cum = es.double().cumsum(-1)
        target = u * cum[:, -1]
        j = torch.searchsorted(cum, target[:, None], right=True).squeeze(1).clamp(max=w - 1)
        # a token with zero mass is never drawn: step back to the last token with mass
        has = es.gather(1, j[:, None]).squeeze(1) > 0
        if not bool(has.all()):
            last = torch.where(es > 0, cols[None, :], torch.full_like(es, -1, dtype=torch.long)).amax(-1)
            j = torch.where(has, j, last.clamp(min=0))
        if not use_top_p or rnd == MAX_ROUNDS - 1:
            tok[todo] = j
            break
        xj = xs.gather(1, j[:, None])
        better = _chunked_mass(torch.where(xs > xj, e[todo], torch.zeros_like(es)))
        ok = (top_p[todo] >= 1) | (better < top_p[todo].double() * z0[todo])
        tok[todo[ok]] = j[ok]
        piv[todo[~ok]] = xj[~ok].squeeze(1)
        todo = todo[~ok]
        if not todo.numel():
            break
    return tok


def reference_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                    top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """The distribution the sampler draws from, by definition (float64 [B, V]): softmax(logits /
    T), then min-p (p >= min_p * max p), top-k (the k best, ties at the k-th value kept), top-p
    (a token stays when the mass of the strictly more likely survivors is below top_p of theirs),
    renormalised. For tests and checks: it sorts the whole vocabulary."""
    x = logits.double() / temperature.double()[:, None]
    keep = torch.ones_like(x, dtype=torch.bool)
    p = x.softmax(-1)
    keep &= p >= min_p.double()[:, None] * p.amax(-1, keepdim=True)
    k = torch.where(top_k > 0, top_k, x.shape[1]).clamp(max=x.shape[1])
    kth = x.sort(-1, descending=True).values.gather(1, (k - 1)[:, None])
    keep &= x >= kth
    p = torch.where(keep, p, torch.zeros_like(p))
    p = p / p.sum(-1, keepdim=True)
    srt, idx = p.sort(-1, descending=True)
    before = srt.cumsum(-1) - srt
    # tied tokens share the mass before the first of them
    first = torch.cat([torch.ones_like(srt[:, :1], dtype=torch.bool), srt[:, 1:] != srt[:, :-1]], 1)
    pos = torch.where(first, torch.arange(srt.shape[1]).expand_as(srt), torch.zeros_like(idx))
    pos = pos.cummax(-1).values
    before = before.gather(1, pos)
    cut = (before >= top_p.double()[:, None]) & (top_p < 1)[:, None]
    srt = srt.masked_fill(cut, 0.0)
    out = torch.zeros_like(p).scatter_(1, idx, srt)
    return out / out.sum(-1, keepdim=True)


def apply_penalties_torch(logits: torch.Tensor, token_state: torch.Tensor, batch_rows: torch.Tensor,
                          state_rows: torch.Tensor, repetition: torch.Tensor, frequency: torch.Tensor,
                          presence: torch.Tensor) -> None:
    """vLLM's penalties, in place on fp32 logits [B, V] for rows batch_rows (int64 [N]), whose
    token statistics are token_state[state_rows] (int32 [R, V], see PROMPT_BIT): repetition over
    prompt and output tokens (divide positive logits, multiply negative ones), then frequency
    (times the output count) and presence (once per output token seen)."""
    st = token_state.index_select(0, state_rows)
    cnt = (st & COUNT_MASK).float()
    x = logits.index_select(0, batch_rows)
    rep = repetition[:, None]
    x = torch.where(st != 0, torch.where(x > 0, x / rep, x * rep), x)
    x = x - frequency[:, None] * cnt - presence[:, None] * (cnt > 0).float()
    logits.index_copy_(0, batch_rows, x)
