"""bad_words (vLLM's): no bad word's token sequence is ever completed in a request's output.

The front end tokenizes the words (`InputProcessor.bad_words_token_ids`). A sequence of one token
is masked at every step, as a row's other token masks are (`SamplingState.bad_ids`). A longer one
masks its last token at the steps where the output so far ends with the rest of it: that match
runs here, on the host, for the rows that have such sequences only, against the last tokens of
their output. On an overlapped step the output's last token may still be on the device (a
placeholder on the host): the ban is then conditional on that token's value, which the device
checks, so no step waits for the one before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

# an output token the host has not read back yet (pagoda.worker.input_batch.PLACEHOLDER)
PENDING = -1

Sequence = tuple[tuple[int, ...], int]   # (prefix, last token) of a multi-token sequence


def split_sequences(token_ids: list[list[int]], vocab_size: int) -> tuple[list[int], list[Sequence]]:
    """One-token sequences (always masked) and the longer ones as (prefix, last token)."""
    single = sorted({s[0] for s in token_ids if len(s) == 1 and 0 <= s[0] < vocab_size})
    multi = sorted({(tuple(s[:-1]), s[-1]) for s in token_ids
                    if len(s) > 1 and all(0 <= t < vocab_size for t in s)})
    return single, multi


@dataclass
class BadWordBans:
    """This step's bans: token `ids[i]` of batch row `rows[i]` gets -inf, if `src[i]` < 0 at
    once, else when the previous step's sampled token `src[i]` equals `expect[i]`."""
    rows: np.ndarray
    ids: np.ndarray
    src: np.ndarray
    expect: np.ndarray

    @property
    def conditional(self) -> bool:
        return bool((self.src >= 0).any())


def match(sequences: list[list[Sequence]], tails: list[list[int]], pending_src: list[int],
          batch_rows: list[int]) -> Optional[BadWordBans]:
    """The bans of rows `batch_rows`, each with its sequences and the last tokens of its output
    (`tails`, at least as long as its longest prefix when the output is; the last one may be
    PENDING, then the previous step's sampled token `pending_src` holds it)."""
    rows, ids, src, expect = [], [], [], []
    for row, seqs, tail, psrc in zip(batch_rows, sequences, tails, pending_src):
        n = len(tail)
        pending = n > 0 and tail[-1] == PENDING
        for prefix, last in seqs:
            m = len(prefix)
            if m > n:
                continue
            seg = tail[n - m:]
            if not pending:
                if tuple(seg) == prefix:
                    rows.append(row), ids.append(last), src.append(-1), expect.append(0)
            elif psrc >= 0 and tuple(seg[:-1]) == prefix[:-1]:
                rows.append(row), ids.append(last), src.append(psrc), expect.append(prefix[-1])
    if not rows:
        return None
    arr = [np.asarray(a, dtype=np.int64) for a in (rows, ids, src, expect)]
    return BadWordBans(*arr)


def apply_bans_(logits: torch.Tensor, bans: BadWordBans, dev: dict[str, torch.Tensor],
                prev_tokens: Optional[torch.Tensor]) -> None:
    """logits[rows, ids] = -inf where the ban holds (`dev`: the bans' arrays on the device). The
    -infs are added (accumulate), so one token banned twice in a row, once conditionally, is
    still banned when either holds."""
    rows, ids, src, expect = dev["ban_rows"], dev["ban_ids"], dev["ban_src"], dev["ban_expect"]
    if bans.conditional and prev_tokens is not None:
        hit = (src < 0) | (prev_tokens.index_select(0, src.clamp(min=0)) == expect)
    else:
        hit = src < 0
    add = torch.zeros(hit.shape, dtype=logits.dtype, device=logits.device).masked_fill_(hit, float("-inf"))
    logits.index_put_((rows, ids), add, accumulate=True)
