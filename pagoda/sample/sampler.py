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

from pagoda.sample.metadata import SamplingMetadata
from pagoda.sample.logprobs import LogprobsLists


@dataclass
class SampleResult:
    token_ids: torch.Tensor            # int64 [rows], on the logits' device
    logprobs: Optional[LogprobsLists]  # rows aligned with token_ids (empty for rows that asked none)


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without a stream sync (a plain torch.tensor(..., device=cuda)
    copies from pageable memory and waits for the GPU, which would stall an overlapped step)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    V = logits.shape[1]
    for i, p in enumerate(meta.params):
        if p.repetition_penalty != 1.0:
            seen = set(meta.prompt_token_ids[i]) | set(meta.output_token_ids[i])
            ids = torch.tensor(sorted(seen), device=logits.device, dtype=torch.long)
            ids = ids[ids < V]
            row = logits[i, ids]
            logits[i, ids] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            out = meta.output_token_ids[i]
            if out:
                counts = torch.bincount(torch.tensor(out, device=logits.device), minlength=V)[:V].float()
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def _filter_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                              min_p: torch.Tensor, need: Optional[tuple[bool, bool, bool]] = None
                              ) -> torch.Tensor:
    """Mask (to -inf) everything outside each row's top-k, nucleus top-p and min-p sets.
    `need` = (any min-p, any top-k, any top-p) when the caller knows it on the host: deciding from
    the device tensors costs a stream sync."""
    V = logits.shape[1]
    if need is None:
        need = (bool((min_p > 0).any()), bool(((top_k > 0) & (top_k < V)).any()), bool((top_p < 1).any()))
    need_min_p, need_k, need_p = need
    if need_min_p:
        probs = torch.softmax(logits, dim=-1)
        thresh = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < thresh, float("-inf"))
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


def needs_token_history(p) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


class Sampler:
    def __init__(self, vocab_size: int, seed: int = 0, device: str | torch.device = "cpu"):
        self.vocab_size = vocab_size
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SampleResult:
        """Sampled ids stay on the device (no sync) unless a row asks for logprobs."""
        if meta.all_plain_greedy:
            return SampleResult(logits.argmax(dim=-1), None)  # the common greedy batch
        logits = logits.float()
        dev = logits.device
        V = logits.shape[1]
        ps = meta.params
        max_lp = meta.max_num_logprobs
        raw_logprobs = torch.log_softmax(logits, dim=-1) if max_lp >= 0 else None

        if any(p.logit_bias for p in ps):
            rows, cols, vals = [], [], []
            for i, p in enumerate(ps):
                for tid, bias in (p.logit_bias or {}).items():
                    if 0 <= tid < V:
                        rows.append(i), cols.append(tid), vals.append(bias)
            if rows:
                logits = logits.index_put((to_device(rows, torch.long, dev), to_device(cols, torch.long, dev)),
                                          to_device(vals, torch.float32, dev), accumulate=True)
        # min_tokens: no stop/EOS token before the minimum length; begin-suppressed tokens
        # never come first
        rows, cols = [], []
        for i, p in enumerate(ps):
            banned = []
            if p.min_tokens and meta.num_output_tokens[i] < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(p.eos_token_ids))
            if p.begin_suppress_token_ids and meta.num_output_tokens[i] == 0:
                banned += p.begin_suppress_token_ids
            for t in banned:
                if 0 <= t < V:
                    rows.append(i), cols.append(t)
        if rows:
            logits[to_device(rows, torch.long, dev), to_device(cols, torch.long, dev)] = float("-inf")
        if meta.output_token_ids is not None:  # penalties read the token history
            _apply_penalties(logits, meta)

        tokens = logits.argmax(dim=-1)
        greedy_host = [p.greedy for p in ps]
        if not all(greedy_host):
            temp = to_device([1.0 if p.greedy else p.temperature for p in ps], torch.float32, dev).unsqueeze(1)
            top_k = to_device([p.top_k for p in ps], torch.long, dev)
            top_p = to_device([p.top_p for p in ps], torch.float32, dev)
            min_p = to_device([p.min_p for p in ps], torch.float32, dev)
            need = (any(p.min_p > 0 for p in ps), any(0 < p.top_k < V for p in ps), any(p.top_p < 1 for p in ps))
            scaled = _filter_top_k_top_p_min_p(logits / temp, top_k, top_p, min_p, need)
            probs = torch.softmax(scaled, dim=-1)
            # Gumbel-style race: argmax(p / E), E ~ Exp(1), is a draw from p. Seeded requests draw E
            # from their own generator, so their samples don't depend on batch neighbours.
            noise = torch.empty_like(probs)
            seeded = [i for i, g in enumerate(meta.generators) if g is not None and not ps[i].greedy]
            if len(seeded) < len(ps):
                noise.exponential_(generator=self.generator)
            for i in seeded:
                e = torch.empty(probs.shape[1]).exponential_(generator=meta.generators[i])
                noise[i] = e.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else e
            sampled = (probs / noise).argmax(dim=-1)
            tokens = torch.where(to_device(greedy_host, torch.bool, dev), tokens, sampled)

        lps = None
        if raw_logprobs is not None:
            k = max(1, max_lp)
            top_vals, top_ids = raw_logprobs.topk(k, dim=-1)
            chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
            ranks = (raw_logprobs > chosen.unsqueeze(1)).sum(dim=-1) + 1
            top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
            chosen, ranks, toks = chosen.tolist(), ranks.tolist(), tokens.tolist()
            lps = LogprobsLists([], [], [])
            for i, p in enumerate(ps):
                n = p.logprobs
                if n is None:
                    lps.token_ids.append([]), lps.logprobs.append([]), lps.ranks.append(0)
                else:
                    lps.token_ids.append([toks[i]] + top_ids[i][:n])
                    lps.logprobs.append([chosen[i]] + top_vals[i][:n])
                    lps.ranks.append(ranks[i])
        return SampleResult(tokens, lps)


def prompt_logprobs_rows(logits: torch.Tensor, next_ids: list[int], k: int) -> LogprobsLists:
    """For each prompt position: the actual next prompt token's logprob and rank, then top-k."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(next_ids, device=lp.device)
    chosen = lp.gather(1, ids.unsqueeze(1)).squeeze(1)
    ranks = ((lp > chosen.unsqueeze(1)).sum(dim=-1) + 1).tolist()
    tv, ti = lp.topk(max(k, 1), dim=-1)
    tv, ti, chosen = tv.tolist(), ti.tolist(), chosen.tolist()
    return LogprobsLists([[next_ids[r]] + ti[r][:k] for r in range(len(next_ids))],
                         [[chosen[r]] + tv[r][:k] for r in range(len(next_ids))], ranks)
