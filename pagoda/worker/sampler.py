"""Batched sampling: logit bias, min_tokens, penalties, temperature, top-k / top-p / min-p,
seeded per-request generators, and logprobs.

The common cases (all greedy; plain temperature/top-k/top-p without seeds or penalties) run as a
handful of batched tensor ops with no per-request Python loop. Logprobs are those of the raw model
distribution (before penalties and temperature), as vLLM reports them by default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pagoda.engine.request import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]                       # one per sampled row
    logprobs: Optional[list[Optional[tuple[float, int, list[tuple[int, float]]]]]]  # (lp, rank, top-k)


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    V = logits.shape[1]
    for i, s in enumerate(seqs):
        p = s.params
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(sorted(set(s.token_ids)), device=logits.device, dtype=torch.long)
            ids = ids[ids < V]
            row = logits[i, ids]
            logits[i, ids] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            out = s.output_token_ids
            if out:
                counts = torch.bincount(torch.tensor(out, device=logits.device), minlength=V)[:V].float()
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def _filter_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                              min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) everything outside each row's top-k, nucleus top-p and min-p sets."""
    V = logits.shape[1]
    if bool((min_p > 0).any()):
        probs = torch.softmax(logits, dim=-1)
        thresh = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < thresh, float("-inf"))
    need_k = bool(((top_k > 0) & (top_k < V)).any())
    need_p = bool((top_p < 1).any())
    if not (need_k or need_p):
        return logits
    sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
    mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if need_k:
        k = torch.where(top_k > 0, top_k, V).clamp(max=V)
        ranks = torch.arange(V, device=logits.device).unsqueeze(0)
        mask |= ranks >= k.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    if need_p:
        probs = torch.softmax(sorted_logits, dim=-1)
        cum = probs.cumsum(dim=-1)
        # drop a token when the tokens ranked before it already reach top_p (always keep the first)
        mask |= (cum - probs) >= top_p.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, idx, sorted_logits)


class Sampler:
    def __init__(self, vocab_size: int, seed: int = 0, device: str | torch.device = "cpu"):
        self.vocab_size = vocab_size
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        if all(s.params.greedy and s.params.logprobs is None and not s.params.logit_bias
               and not s.params.min_tokens and s.params.repetition_penalty == 1.0
               and not s.params.presence_penalty and not s.params.frequency_penalty for s in seqs):
            return SampleResult(logits.argmax(dim=-1).tolist(), None)  # the common greedy batch
        logits = logits.float()
        dev = logits.device
        max_lp = max((s.params.logprobs or 0) if s.params.logprobs is not None else -1 for s in seqs)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if max_lp >= 0 else None

        if any(s.params.logit_bias for s in seqs):
            logits = logits.clone()
            for i, s in enumerate(seqs):
                for tid, bias in (s.params.logit_bias or {}).items():
                    if 0 <= tid < logits.shape[1]:
                        logits[i, tid] += bias
        # min_tokens: no stop/EOS token before the minimum length
        for i, s in enumerate(seqs):
            p = s.params
            if p.min_tokens and s.num_output_tokens < p.min_tokens:
                stops = list(p.stop_token_ids) + ([] if p.ignore_eos else list(p.eos_token_ids))
                stops = [t for t in stops if 0 <= t < logits.shape[1]]
                if stops:
                    logits[i, stops] = float("-inf")
        if any(s.params.repetition_penalty != 1.0 or s.params.presence_penalty or s.params.frequency_penalty
               for s in seqs):
            _apply_penalties(logits, seqs)

        greedy = torch.tensor([s.params.greedy for s in seqs], device=dev)
        tokens = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            temp = torch.tensor([1.0 if s.params.greedy else s.params.temperature for s in seqs],
                                device=dev).unsqueeze(1)
            top_k = torch.tensor([s.params.top_k for s in seqs], device=dev)
            top_p = torch.tensor([s.params.top_p for s in seqs], device=dev)
            min_p = torch.tensor([s.params.min_p for s in seqs], device=dev)
            scaled = _filter_top_k_top_p_min_p(logits / temp, top_k, top_p, min_p)
            probs = torch.softmax(scaled, dim=-1)
            # Gumbel-style race: argmax(p / E), E ~ Exp(1), is a draw from p. Seeded requests draw E
            # from their own generator, so their samples don't depend on batch neighbours.
            noise = torch.empty_like(probs)
            seeded = [i for i, s in enumerate(seqs) if s.generator is not None and not s.params.greedy]
            if len(seeded) < len(seqs):
                noise.exponential_(generator=self.generator)
            for i in seeded:
                e = torch.empty(probs.shape[1]).exponential_(generator=seqs[i].generator)
                noise[i] = e.to(dev)
            sampled = (probs / noise).argmax(dim=-1)
            tokens = torch.where(greedy, tokens, sampled)
        token_list = tokens.tolist()

        lps = None
        if raw_logprobs is not None:
            lps = []
            k = max(1, max_lp)
            top_vals, top_ids = raw_logprobs.topk(k, dim=-1)
            chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
            ranks = (raw_logprobs > chosen.unsqueeze(1)).sum(dim=-1) + 1
            top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
            chosen, ranks = chosen.tolist(), ranks.tolist()
            for i, s in enumerate(seqs):
                n = s.params.logprobs
                if n is None:
                    lps.append(None)
                else:
                    lps.append((chosen[i], ranks[i], list(zip(top_ids[i][:n], top_vals[i][:n]))))
        return SampleResult(token_list, lps)


def prompt_logprobs_rows(logits: torch.Tensor, next_ids: list[int], k: int):
    """For each prompt position: (logprob of the actual next prompt token, its rank, top-k)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(next_ids, device=lp.device)
    chosen = lp.gather(1, ids.unsqueeze(1)).squeeze(1)
    ranks = ((lp > chosen.unsqueeze(1)).sum(dim=-1) + 1).tolist()
    tv, ti = lp.topk(max(k, 1), dim=-1)
    tv, ti, chosen = tv.tolist(), ti.tolist(), chosen.tolist()
    return [(chosen[r], ranks[r], list(zip(ti[r][:k], tv[r][:k]))) for r in range(len(next_ids))]
