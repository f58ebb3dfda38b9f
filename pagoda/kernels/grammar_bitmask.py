"""Structured outputs' token bitmask applied to chosen rows of the logits, torch reference.

`bitmask` is int32 [k, ceil(G / 32)] (32 tokens a word, bit set = allowed), row j for logits row
`rows[j]`; G is the grammar's vocabulary (the tokenizer's ids). Tokens at or past G (a model's
padded vocabulary) are never allowed in a constrained row; every other row is left untouched.
`pagoda.kernels.grammar_bitmask_triton` (CUDA) does it in one launch, with no batch-wide mask;
on the CPU xgrammar's C++ kernel does (`apply_bitmask_rows_cpu`).
"""
from __future__ import annotations

import torch


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [n, W] -> bool [n, vocab_size] (True = allowed; False past W * 32)."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).reshape(bitmask.shape[0], -1).bool()
    if bits.shape[1] < vocab_size:
        bits = torch.nn.functional.pad(bits, (0, vocab_size - bits.shape[1]), value=False)
    return bits[:, :vocab_size]


def apply_bitmask_rows_reference(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int],
                                 grammar_vocab: int) -> torch.Tensor:
    """logits with rows[j] masked by bitmask[j] (in place, returned)."""
    if not rows:
        return logits
    allowed = unpack_bitmask(bitmask.to(logits.device), min(grammar_vocab, logits.shape[-1]))
    allowed = torch.nn.functional.pad(allowed, (0, logits.shape[-1] - allowed.shape[1]), value=False)
    idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
    return logits


def apply_bitmask_rows_cpu(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int],
                           grammar_vocab: int) -> torch.Tensor:
    """As the reference, with xgrammar's C++ kernel (it reads the bitmask row of the logits row
    it masks: the rows are spread over an all-allowed mask of the batch first)."""
    import xgrammar as xgr
    if not rows:
        return logits
    vocab = min(grammar_vocab, logits.shape[-1], bitmask.shape[-1] * 32)
    if rows == list(range(logits.shape[0])):
        full, indices = bitmask, None
    else:
        full = torch.full((logits.shape[0], bitmask.shape[1]), -1, dtype=torch.int32)
        full[rows] = bitmask
        indices = rows
    xgr.apply_token_bitmask_inplace(logits, full, vocab_size=vocab, indices=indices)
    if vocab < logits.shape[-1]:  # ids the grammar's tokenizer does not have
        logits[rows, vocab:] = float("-inf")
    return logits


def apply_bitmask_rows(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | list[int],
                       grammar_vocab: int) -> torch.Tensor:
    """The platform's kernel: Triton on CUDA (bitmask and rows on the device), C++ on the CPU."""
    if logits.device.type == "cuda":
        from pagoda.kernels.grammar_bitmask_triton import apply_bitmask_rows_triton
        return apply_bitmask_rows_triton(logits, bitmask, rows, grammar_vocab)
    return apply_bitmask_rows_cpu(logits, bitmask, rows if isinstance(rows, list) else rows.tolist(),
                                  grammar_vocab)
