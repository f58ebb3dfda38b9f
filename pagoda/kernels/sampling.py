"""Batched token sampling on the device: greedy, temperature, top-k, top-p, min-p.

Every row of a batch is handled by the same few tensor ops (one sort when top-k or top-p is on
anywhere, one softmax, one argmax), so the common case has no per-request Python loop and no
host sync. Sampling uses the exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. draws token
i with probability p_i, which lets seeded requests supply their own noise rows.
"""
from __future__ import annotations

import torch

GREEDY_EPS = 1e-5  # temperatures below this mean greedy (as SamplingParams.greedy)


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor | None = None,
                            top_p: torch.Tensor | None = None,
                            min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Return logits [B, V] with filtered-out tokens set to -inf, in the order top-k, top-p, min-p.

    top_k: int [B], 0 = off. top_p: float [B] in (0, 1], 1 = off. min_p: float [B], 0 = off.
    Pass None for a filter no row of the batch uses (skips its work).
    """
    if top_k is not None or top_p is not None:
        vocab = logits.shape[-1]
        srt, idx = logits.sort(dim=-1, descending=True)
        if top_k is not None:
            k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
            rank = torch.arange(vocab, device=logits.device)
            srt = srt.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
        if top_p is not None:
            p = srt.softmax(dim=-1)
            before = p.cumsum(dim=-1) - p  # mass of the better tokens; the best always stays
            # top_p == 1 keeps all: the fp32 cumsum can reach 1.0 before the tail's last tokens
            cut = (before >= top_p.to(p.dtype)[:, None]) & (top_p < 1)[:, None]
            srt = srt.masked_fill(cut, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, idx, srt)
    if min_p is not None:
        p = logits.softmax(dim=-1)
        floor = p.amax(dim=-1, keepdim=True) * min_p.to(p.dtype)[:, None]
        logits = logits.masked_fill(p < floor, float("-inf"))
    return logits


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
