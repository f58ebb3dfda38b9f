"""Structured outputs on the device: tokens outside a request's grammar get -inf logits, for the
constrained rows only (free rows are never touched, so their outputs do not change).

The engine core fills a packed bitmask per constrained request (`GrammarBitmask`, 32 tokens per
int32, bit set = allowed); here it is copied to the device and applied with xgrammar's kernel
(Triton on CUDA, C++ on the CPU). `apply_token_bitmask_reference` is the torch twin the kernel
is tested against.
"""
from __future__ import annotations

from typing import Optional

import torch


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [n, ceil(V/32)] -> bool [n, V] (True = allowed)."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_token_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """The torch reference: every row of logits masked by the same row of the bitmask."""
    allowed = unpack_bitmask(bitmask.to(logits.device), logits.shape[-1])
    return logits.masked_fill(~allowed, float("-inf"))


def _apply_kernel(logits: torch.Tensor, bitmask: torch.Tensor, indices=None) -> None:
    import xgrammar as xgr
    # logits padded past the vocabulary the grammar knows keep their padding unmasked
    vocab = min(logits.shape[-1], bitmask.shape[-1] * 32)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=indices)


def apply_token_bitmask(logits: torch.Tensor, grammar, req_ids: list[str]) -> torch.Tensor:
    """Mask the rows of `logits` (one per entry of `req_ids`) that `grammar` (a
    `SchedulerOutput.grammar`, or None) constrains; returns the logits (masked in place).

    Only the constrained rows' bitmask is copied to the device (pinned, without a stream sync);
    it is spread over an all-allowed mask of the batch there and applied to those rows only."""
    if grammar is None:
        return logits
    bitmask: Optional[torch.Tensor] = grammar.get()
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
    if src != list(range(bitmask.shape[0])):
        bitmask = bitmask[src]
    dev, n = logits.device, logits.shape[0]
    on_cuda = dev.type == "cuda"
    if on_cuda:
        bitmask = (bitmask if bitmask.is_pinned() else bitmask.pin_memory()).to(dev, non_blocking=True)
    if rows == list(range(n)):
        _apply_kernel(logits, bitmask)
        return logits
    index = torch.tensor(rows, dtype=torch.int32)
    if on_cuda:
        index = index.pin_memory().to(dev, non_blocking=True)
    full = torch.full((n, bitmask.shape[1]), -1, dtype=torch.int32, device=dev)
    full[index.long()] = bitmask
    _apply_kernel(logits, full, index if on_cuda else rows)
    return logits
