"""Token sampling kernels, torch references: the row sampler and the penalties.

The row sampler draws one token per row from softmax(x / T) restricted to the min-p, top-k and
top-p sets (vLLM's order: min-p on the whole distribution, then top-k, then top-p over what is
left), without sorting the vocabulary. It is exact rejection sampling in the style of FlashInfer's
sampling kernels:

1. draw j from the current support S (at first: the min-p set) by the exponential race:
   j = argmax over S of x_t - log(E_t), E_t ~ Exp(1) i.i.d., which picks t with probability
   softmax(x)_t over S. E_t comes from Philox4x32-10 keyed by the request's seed and counted by
   (token t, output position, round) (`race_noise`): the draw depends on nothing but the row
   itself, so seeded requests are reproducible and independent of their batch neighbours, and
   a logit that moves by rounding (another batch size) moves the draw only when the two best
   scores are that close;
2. j is in the top-p set exactly when the mass of the tokens strictly more likely than j is
   below top_p (of the min-p set's mass): accept it;
3. otherwise every token no more likely than j is outside the set too: S = {x > x_j}, go to 1.

Conditional on acceptance the token is distributed as softmax over the top-p set, whatever
the rounds before did, so the result equals the reference definition (`reference_probs`);
rejections are rare (round 1 accepts with probability >= top_p). Top-k is handled by the
caller: rows with top-k pass only their k best logits (a torch.topk) as the row. Tokens tied
with the boundary token are all kept (a threshold on the probability, unlike a sort, which
keeps an arbitrary subset of a tie). Masses are fp32 sums within a chunk, fp64 across chunks.

`pagoda.kernels.sampling_triton` (CUDA) and `cpu_sampling.c` (CPU) run the same algorithm with
the same noise, one row at a time, with no host sync; this torch twin syncs once per round.
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
CHUNK = 2048        # the kernels' chunk; the torch twin sums chunk by chunk the same way

_M32 = np.uint64(0xFFFFFFFF)
_KEY_A, _KEY_B = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_ROUND_A, _ROUND_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)


def philox4x32(seed: np.ndarray, c0, c1, c2, c3) -> tuple[np.ndarray, ...]:
    """Philox4x32-10 (key = the 64-bit seed, counter = four 32-bit words), as
    triton.language.random.philox computes it; arrays broadcast."""
    seed = np.asarray(seed).astype(np.uint64)
    k0, k1 = seed & _M32, seed >> np.uint64(32)
    c0, c1, c2, c3 = np.broadcast_arrays(*(np.asarray(c).astype(np.uint64) & _M32 for c in (c0, c1, c2, c3)))
    k0, k1 = np.broadcast_to(k0, c0.shape), np.broadcast_to(k1, c0.shape)
    with np.errstate(over="ignore"):
        for _ in range(10):
            p0, p2 = _ROUND_A * c0, _ROUND_B * c2   # exact: both factors < 2**32
            c0, c2, c1, c3 = ((p2 >> np.uint64(32)) ^ c1 ^ k0, (p0 >> np.uint64(32)) ^ c3 ^ k1,
                              p2 & _M32, p0 & _M32)
            k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def race_noise(seed: np.ndarray, position: np.ndarray, rnd: int, width: int) -> torch.Tensor:
    """log(E) [N, width] of the exponential race, E ~ Exp(1): for row i and token t, word t % 4 of
    Philox(seed[i], counter = (t // 4, position[i] low, position[i] high, rnd)), as 32 bits
    v = (bits + 1/2) / 2**32, E = -log(1 - v) (a series for small v, where 1 - v would round)."""
    pos = np.asarray(position).astype(np.int64).view(np.uint64)[:, None]
    groups = np.arange((width + 3) // 4, dtype=np.uint64)[None, :]
    words = philox4x32(np.asarray(seed)[:, None], groups, pos & _M32, pos >> np.uint64(32), rnd)
    bits = np.stack(words, -1).reshape(len(pos), -1)[:, :width]
    v = torch.from_numpy(bits.astype(np.float32)) * 2.0 ** -32 + 2.0 ** -33
    series = v * (1 + v * (0.5 + v * (1 / 3 + v * 0.25)))
    e = torch.where(v < 1 / 64, series, -torch.log(1 - v))
    return torch.log(e)


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
    x = vals.index_select(0, index).float() * inv_temp.float()[:, None]
    n, w = x.shape
    cols = torch.arange(w, device=x.device)
    x = x.masked_fill(cols[None, :] >= width[:, None], float("-inf"))
    m = x.amax(-1)
    m = torch.where(m > float("-inf"), m, torch.zeros_like(m))   # a row with nothing to draw
    lo = torch.full_like(m, float("-inf"))
    if use_min_p:
        lo = torch.where(min_p > 0, m + torch.log(min_p.float().clamp_min(1e-30)), lo)
    keep = x >= lo[:, None]
    e = torch.where(keep, torch.exp(x - m[:, None]), torch.zeros_like(x))
    z0 = _chunked_mass(e) if use_top_p else None
    piv = torch.full_like(m, float("-inf"))
    tok = torch.zeros(n, dtype=torch.long, device=x.device)
    todo = torch.arange(n, device=x.device)
    seed, position = np.asarray(seed), np.asarray(position)
    for rnd in range(MAX_ROUNDS):
        sel = todo.cpu().numpy()
        xs = x[todo]
        noise = race_noise(seed[sel], position[sel], rnd, w).to(x.device)
        live = keep[todo] & (xs > piv[todo, None])
        j = torch.where(live, xs - noise, torch.full_like(xs, float("-inf"))).argmax(-1)
        if not use_top_p or rnd == MAX_ROUNDS - 1:
            tok[todo] = j
            break
        xj = xs.gather(1, j[:, None])
        better = _chunked_mass(torch.where(xs > xj, e[todo], torch.zeros_like(xs)))
        # the most likely token always stays (better == 0: also a row with no mass at all)
        ok = (top_p[todo] >= 1) | (better < top_p[todo].double() * z0[todo]) | (better == 0)
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
