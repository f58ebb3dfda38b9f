"""What the sampler needs to know about the rows it samples this step (one row per request that
finished its prompt): where their state lives in the device-side `SamplingState`, and which rows
each operation touches, as host index arrays (to decide what to run without a device sync) and
the same indices on the device (uploaded in one copy)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch

from pagoda.sample.bad_words import BadWordBans, match
from pagoda.sample.ops import to_device
from pagoda.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagoda.sample.state import SamplingState

# the per-step index arrays, in upload order (batch indices unless named *_rows = state rows)
_INDEX_NAMES = ("rows", "positions", "full", "full_width", "cand", "cand_k", "penalized",
                "penalized_rows", "biased", "biased_rows", "stopped", "stopped_rows", "suppressed",
                "suppressed_rows", "allowed", "allowed_rows", "banned", "banned_rows", "logprobs")
_BAN_NAMES = ("ban_rows", "ban_ids", "ban_src", "ban_expect")   # BadWordBans' fields, on the device

# (batch index, m) -> the last m output tokens of that row (fewer if its output is shorter) and,
# when the last of them is not on the host yet, its index in the previous step's sampled tokens
OutputTail = Callable[[int, int], tuple[list[int], int]]


@dataclass
class SamplingMetadata:
    params: list[SamplingParams]     # each row's params, batch order
    state: "SamplingState"
    rows: np.ndarray                 # each row's row in the state
    positions: np.ndarray            # the output index each row samples (Philox counter, min_tokens)
    all_plain_greedy: bool           # argmax of the logits is the whole job
    greedy: np.ndarray               # bool per row
    full: np.ndarray                 # random rows without top-k (the row sampler reads the row)
    cand: np.ndarray                 # random rows with top-k (it reads the row's k best)
    penalized: np.ndarray            # rows with a repetition / frequency / presence penalty
    biased: np.ndarray               # rows with a logit bias
    stopped: np.ndarray              # rows below min_tokens: stop and EOS tokens masked
    suppressed: np.ndarray           # rows at their first output token with begin-suppressed ids
    logprobs: np.ndarray             # rows that return logprobs
    allowed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # allowed_token_ids
    banned: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))   # one-token bad words
    bans: Optional[BadWordBans] = None   # multi-token bad words that may complete this step
    prev_tokens: Optional[torch.Tensor] = None   # the previous step's sampled ids (bans' checks)
    dev: dict[str, torch.Tensor] = field(default_factory=dict)   # the index arrays on the device

    @classmethod
    def build(cls, state: "SamplingState", params: list[SamplingParams], rows: np.ndarray,
              positions: np.ndarray, tail: Optional[OutputTail] = None,
              prev_tokens: Optional[torch.Tensor] = None) -> "SamplingMetadata":
        rows = np.asarray(rows, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        greedy = state.greedy[rows]
        k = state.top_k[rows]
        flat = np.flatnonzero
        idx = dict(rows=rows, positions=positions, full=flat(~greedy & (k == 0)),
                   cand=flat(~greedy & (k > 0)), penalized=flat(state.penalized[rows]),
                   biased=flat(state.num_bias[rows] > 0),
                   stopped=flat((positions < state.min_tokens[rows]) & (state.num_stop[rows] > 0)),
                   suppressed=flat((positions == 0) & (state.num_begin[rows] > 0)),
                   allowed=flat(state.num_allowed[rows] > 0), banned=flat(state.num_bad[rows] > 0),
                   logprobs=flat(state.num_logprobs[rows] >= 0))
        bans = None
        multi = flat(state.max_bad_prefix[rows] > 0)
        if len(multi) and tail is not None:  # the rows with multi-token bad words only
            got = [tail(int(i), int(state.max_bad_prefix[rows[i]])) for i in multi]
            bans = match([state.bad_sequences[int(rows[i])] for i in multi], [g[0] for g in got],
                         [g[1] for g in got], multi.tolist())
        plain = bool(greedy.all()) and bans is None and not any(
            len(idx[n]) for n in ("penalized", "biased", "stopped", "suppressed", "allowed", "banned",
                                  "logprobs"))
        meta = cls(params, state, rows, positions, plain, greedy, idx["full"], idx["cand"],
                   idx["penalized"], idx["biased"], idx["stopped"], idx["suppressed"], idx["logprobs"],
                   idx["allowed"], idx["banned"], bans, prev_tokens)
        if plain:
            return meta
        idx["full_width"] = np.full(len(idx["full"]), state.vocab_size, dtype=np.int64)
        idx["cand_k"] = k[idx["cand"]]
        for n in ("penalized", "biased", "stopped", "suppressed", "allowed", "banned"):
            idx[n + "_rows"] = rows[idx[n]]
        names = _INDEX_NAMES
        if bans is not None:
            idx.update(zip(_BAN_NAMES, (bans.rows, bans.ids, bans.src, bans.expect)))
            names = names + _BAN_NAMES
        arrays = [idx[n] for n in names]
        d = to_device(np.concatenate(arrays).astype(np.int64), torch.long, state.device)
        start = 0
        for n, a in zip(names, arrays):
            meta.dev[n] = d[start:start + len(a)]
            start += len(a)
        return meta

    @property
    def max_num_logprobs(self) -> int:
        """Largest logprobs asked for (-1: no row wants logprobs)."""
        if not len(self.logprobs):
            return -1
        return int(self.state.num_logprobs[self.rows[self.logprobs]].max())
