"""Structured outputs on the device: tokens outside a request's grammar get -inf logits, for the
constrained rows only (free rows are never touched, so their outputs do not change).

The engine core fills a packed bitmask with one row per constrained request (`GrammarBitmask`, 32
tokens per int32, bit set = allowed, pinned on CUDA); here it is copied to the device without a
sync and applied to those requests' rows of the sampling logits in one kernel
(pagoda.kernels.grammar_bitmask: Triton on CUDA, C++ on the CPU, beside its torch reference).
"""
from __future__ import annotations

import torch

from pagoda.kernels.grammar_bitmask import apply_bitmask_rows
from pagoda.sample.ops import to_device


def apply_token_bitmask(logits: torch.Tensor, grammar, req_ids: list[str]) -> torch.Tensor:
    """Mask the rows of `logits` (one per entry of `req_ids`) that `grammar` (a
    `SchedulerOutput.grammar`, or None) constrains; returns the logits (masked in place)."""
    if grammar is None:
        return logits
    bitmask = grammar.get()
    if bitmask is None or not len(grammar.req_ids):
        return logits
    row_of = {r: i for i, r in enumerate(req_ids)}
    rows, src = [], []
    for k, rid in enumerate(grammar.req_ids):
        i = row_of.get(rid)
        if i is not None:
            rows.append(i)
            src.append(k)
    if not rows:
        return logits
    if len(src) != bitmask.shape[0]:  # a request the runner failed (or one-by-one retries)
        bitmask = bitmask[src]
    vocab = grammar.vocab_size or bitmask.shape[1] * 32
    if logits.device.type != "cuda":
        return apply_bitmask_rows(logits, bitmask, rows, vocab)
    dev = logits.device
    bitmask = (bitmask if bitmask.is_pinned() else bitmask.pin_memory()).to(dev, non_blocking=True)
    return apply_bitmask_rows(logits, bitmask, to_device(rows, torch.int32, dev), vocab)
