"""Batched token sampling on the device: greedy, temperature, top-k, top-p, min-p.

Every row of a batch is handled by the same few tensor ops (a top-k over 1024 candidates when
top-k or top-p is on anywhere, one softmax, one argmax), so the common case has no per-request
Python loop. Only the top-k/top-p filter syncs with the host, once, to find rows whose filter
reaches past the candidates. Sampling uses the exponential race: argmax(p / E) with E ~ Exp(1)
i.i.d. draws token i with probability p_i, which lets seeded requests supply their own noise.
"""
from __future__ import annotations

import torch

GREEDY_EPS = 1e-5  # temperatures below this mean greedy (as SamplingParams.greedy)


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor | None = None,
                            top_p: torch.Tensor | None = None, min_p: torch.Tensor | None = None,
                            candidates: int = 1024) -> torch.Tensor:
    """Return logits [B, V] with filtered-out tokens set to -inf, in the order top-k, top-p, min-p.

    top_k: int [B], 0 = off. top_p: float [B] in (0, 1], 1 = off. min_p: float [B], 0 = off.
    Pass None for a filter no row of the batch uses (skips its work).
    candidates: rank only each row's best `candidates` tokens (a top-k instead of a sort of the
    whole vocabulary) when that decides the row exactly; other rows fall back to a full sort
    (one host sync to find them). 0 always sorts everything.
    """
    if top_k is not None or top_p is not None:
        vocab = logits.shape[-1]
        if 0 < candidates < vocab // 2:
            logits = _filter_candidates(logits, top_k, top_p, candidates)
        else:
            srt, idx = logits.sort(dim=-1, descending=True)
            logits = torch.empty_like(logits).scatter_(-1, idx, _filter_sorted(srt, top_k, top_p))
    if min_p is not None:
        p = logits.softmax(dim=-1)
        floor = p.amax(dim=-1, keepdim=True) * min_p.to(p.dtype)[:, None]
        logits = logits.masked_fill(p < floor, float("-inf"))
    return logits


def _rank_limit(top_k: torch.Tensor | None, rows: int, vocab: int, device) -> torch.Tensor:
    if top_k is None:
        return torch.full((rows,), vocab, device=device)
    return torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)


def _filter_sorted(srt: torch.Tensor, top_k, top_p, vocab: int | None = None,
                   full_lse: torch.Tensor | None = None) -> torch.Tensor:
    """Mask logits sorted best-first by rank (top-k), then by probability mass (top-p).

    srt may hold only each row's best few (then vocab is the full size and full_lse the log of
    the full softmax normaliser, used by rows whose top-k does not already bound them).
    """
    vocab = vocab or srt.shape[-1]
    k = _rank_limit(top_k, srt.shape[0], vocab, srt.device)
    rank = torch.arange(srt.shape[-1], device=srt.device)
    srt = srt.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
    if top_p is not None:
        if full_lse is None:
            p = srt.softmax(dim=-1)
        else:
            norm = torch.where(k < vocab, srt.logsumexp(dim=-1), full_lse)
            p = (srt - norm[:, None]).exp()
        before = p.cumsum(dim=-1) - p  # mass of the better tokens; the best always stays
        # top_p == 1 keeps all: the fp32 cumsum can reach 1.0 before the tail's last tokens
        cut = (before >= top_p.to(p.dtype)[:, None]) & (top_p < 1)[:, None]
        srt = srt.masked_fill(cut, float("-inf"))
    return srt


def _filter_candidates(logits: torch.Tensor, top_k, top_p, n: int) -> torch.Tensor:
    rows, vocab = logits.shape
    srt, idx = logits.topk(n, dim=-1)
    k = _rank_limit(top_k, rows, vocab, logits.device)
    no_p = torch.ones(rows, dtype=torch.bool, device=logits.device) if top_p is None \
        else top_p >= 1
    untouched = (k >= vocab) & no_p
    full_lse = logits.logsumexp(dim=-1)
    # exact when the top-k bound lies among the candidates, or when the candidates alone hold
    # the nucleus (every other token comes after them in the ranking)
    exact = k <= n
    if top_p is not None:
        held = (srt - full_lse[:, None]).exp().sum(dim=-1)
        exact |= (k >= vocab) & (held > top_p)
    out = torch.full_like(logits, float("-inf")).scatter_(
        -1, idx, _filter_sorted(srt, top_k, top_p, vocab, full_lse))
    out = torch.where(untouched[:, None], logits, out)
    redo = (~exact & ~untouched).nonzero().squeeze(1)
    if redo.numel():
        sub_k = None if top_k is None else top_k[redo]
        sub_p = None if top_p is None else top_p[redo]
        srt, idx = logits[redo].sort(dim=-1, descending=True)
        out[redo] = torch.empty_like(srt).scatter_(-1, idx, _filter_sorted(srt, sub_k, sub_p))
    return out


def exponential_noise(shape: tuple[int, int], device: torch.device,
                      generators: dict[int, torch.Generator] | None = None) -> torch.Tensor:
    """Exp(1) noise [B, V]; rows named in `generators` come from their own (seeded) generator."""
    e = torch.empty(shape, dtype=torch.float32, device=device).exponential_()
    for row, gen in (generators or {}).items():
        e[row].exponential_(generator=gen)
    return e.clamp_min_(torch.finfo(torch.float32).tiny)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None = None,
           top_p: torch.Tensor | None = None, min_p: torch.Tensor | None = None,
           generators: dict[int, torch.Generator] | None = None, all_greedy: bool = False,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids int64 [B] from logits [B, V].

    temperature: float [B]; rows below GREEDY_EPS take the argmax of the raw logits.
    all_greedy=True (a host-side fact the caller knows) skips everything but the argmax.
    noise: optional Exp(1) draws [B, V] (default: exponential_noise with `generators`).
    """
    greedy = logits.argmax(dim=-1)
    if all_greedy:
        return greedy
    is_greedy = temperature < GREEDY_EPS
    t = torch.where(is_greedy, torch.ones_like(temperature), temperature).float()
    x = apply_top_k_top_p_min_p(logits.float() / t[:, None], top_k, top_p, min_p)
    if noise is None:
        noise = exponential_noise(tuple(x.shape), x.device, generators)
    drawn = (x.softmax(dim=-1) / noise).argmax(dim=-1)
    return torch.where(is_greedy, greedy, drawn)
