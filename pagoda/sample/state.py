"""Each batch row's sampling parameters and token statistics, kept on the device.

A request's row is written once, when it joins the persistent input batch: its parameters
(temperature, top-p, min-p, penalties), its Philox seed, its logit-bias, stop-token, begin-suppressed
and bad-word (one-token) tables, its allowed-token mask (a [rows, vocab] bool tensor, allocated
when a request first sets allowed_token_ids), and for penalised requests the token statistics
(prompt tokens marked, output counts zero). Multi-token bad words stay on the host
(`bad_sequences`: pagoda.sample.bad_words matches them against the output's tail).
From then on the only per-step work is on the device: the sampler gathers the rows it samples
by index, and adds each sampled token to its row's counts straight from the sampled-token
tensor, so penalties need no token history from the host and overlapped steps stay on.
Host mirrors of the per-row flags let each step choose its operations without a device sync.

Requests without a seed get one here, from a generator seeded by the engine's --seed, so every
row draws its noise the same way (Philox keyed by the seed, counted by the output position).
"""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

from pagoda.kernels.sampling import PROMPT_BIT
from pagoda.sample.bad_words import Sequence, split_sequences
from pagoda.sample.metadata import OutputTail, SamplingMetadata
from pagoda.sample.ops import to_device
from pagoda.sampling_params import SamplingParams

# columns of SamplingState.params
INV_TEMP, TOP_P, MIN_P, PRESENCE, FREQUENCY, REPETITION = range(6)
_U64 = (1 << 64) - 1


class SamplingState:
    def __init__(self, max_num_reqs: int, vocab_size: int, device: torch.device, seed: int = 0):
        n, v = max_num_reqs, vocab_size
        self.vocab_size = v
        self.device = device
        self._rng = random.Random(seed)
        # host mirrors
        self.greedy = np.ones(n, dtype=bool)
        self.top_k = np.zeros(n, dtype=np.int64)        # 0: off (k >= vocab is off too)
        self.top_p = np.ones(n, dtype=np.float32)
        self.min_p = np.zeros(n, dtype=np.float32)
        self.penalized = np.zeros(n, dtype=bool)
        self.min_tokens = np.zeros(n, dtype=np.int64)
        self.num_stop = np.zeros(n, dtype=np.int64)     # stop + EOS ids (for min_tokens)
        self.num_begin = np.zeros(n, dtype=np.int64)    # begin-suppressed ids (first token only)
        self.num_bias = np.zeros(n, dtype=np.int64)
        self.num_logprobs = np.full(n, -1, dtype=np.int64)
        self.num_allowed = np.zeros(n, dtype=np.int64)  # allowed_token_ids (0: every token)
        self.num_bad = np.zeros(n, dtype=np.int64)      # one-token bad words
        self.max_bad_prefix = np.zeros(n, dtype=np.int64)  # longest multi-token bad word - 1
        self.bad_sequences: dict[int, list[Sequence]] = {}
        self.seed = np.zeros(n, dtype=np.uint64)
        # device
        self.params = torch.zeros(n, 6, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(n, dtype=torch.long, device=device)       # the seed's 64 bits
        # output count of each token, + PROMPT_BIT for prompt tokens (penalised rows only):
        # max_num_reqs x vocab int32, allocated with the runner so the memory plan sees it
        self.token_state = torch.zeros(n, v, dtype=torch.int32, device=device)
        self.bias_ids = torch.zeros(n, 0, dtype=torch.long, device=device)
        self.bias_vals = torch.zeros(n, 0, dtype=torch.float32, device=device)
        self.stop_ids = torch.zeros(n, 0, dtype=torch.long, device=device)
        self.begin_ids = torch.zeros(n, 0, dtype=torch.long, device=device)
        self.bad_ids = torch.zeros(n, 0, dtype=torch.long, device=device)
        self.allowed: Optional[torch.Tensor] = None   # bool [n, vocab], True = may be sampled
        # rows added since the last flush: (row, params, prompt ids to mark) and (stops, bias,
        # begin-suppressed ids, bad one-token words, allowed ids)
        self._staged: list[tuple[int, SamplingParams, list[int]]] = []
        self._tables: dict[int, tuple[list[int], dict[int, float], list[int], list[int], list[int]]] = {}

    # -- rows join -------------------------------------------------------------------------------
    def add(self, row: int, p: SamplingParams, prompt_token_ids: list[int]) -> None:
        """Take row for a request; its device rows are written by the next flush()."""
        v = self.vocab_size
        self.greedy[row] = p.greedy
        self.top_k[row] = p.top_k if 0 < p.top_k < v else 0
        self.top_p[row] = p.top_p
        self.min_p[row] = p.min_p
        self.penalized[row] = (p.repetition_penalty != 1.0 or bool(p.presence_penalty)
                               or bool(p.frequency_penalty))
        stops = [t for t in (list(p.stop_token_ids) + ([] if p.ignore_eos else list(p.eos_token_ids)))
                 if 0 <= t < v]
        self.min_tokens[row] = p.min_tokens
        self.num_stop[row] = len(stops) if p.min_tokens else 0
        bias = {t: b for t, b in (p.logit_bias or {}).items() if 0 <= t < v}
        self.num_bias[row] = len(bias)
        begin = [t for t in p.begin_suppress_token_ids if 0 <= t < v]
        self.num_begin[row] = len(begin)
        self.num_logprobs[row] = -1 if p.logprobs is None else p.logprobs
        allowed = sorted({t for t in p.allowed_token_ids or () if 0 <= t < v})
        self.num_allowed[row] = len(allowed)
        bad, seqs = split_sequences(p.bad_words_token_ids, v)
        self.num_bad[row] = len(bad)
        self.max_bad_prefix[row] = max((len(pre) for pre, _ in seqs), default=0)
        if seqs:
            self.bad_sequences[row] = seqs
        else:
            self.bad_sequences.pop(row, None)
        seed = p.seed if p.seed is not None else self._rng.getrandbits(64)
        self.seed[row] = seed & _U64
        self._staged.append((row, p, prompt_token_ids if p.repetition_penalty != 1.0 else []))
        self._tables[row] = (stops if p.min_tokens else [], bias, begin, bad, allowed)

    def flush(self) -> None:
        """Write the rows added since the last flush to the device (a few copies for all of them)."""
        if not self._staged:
            return
        dev = self.device
        staged = list({r: (r, p, ids) for r, p, ids in self._staged}.values())  # a row's last
        tables, self._staged, self._tables = self._tables, [], {}
        rows = np.array([r for r, _, _ in staged], dtype=np.int64)
        rows_d = to_device(rows, torch.long, dev)
        self.params.index_copy_(0, rows_d, to_device(np.array(
            [[1.0 / p.temperature if not p.greedy else 1.0, p.top_p, p.min_p, p.presence_penalty,
              p.frequency_penalty, p.repetition_penalty] for _, p, _ in staged], dtype=np.float32),
            torch.float32, dev))
        self.seeds.index_copy_(0, rows_d, to_device(self.seed[rows].view(np.int64), torch.long, dev))
        pen = rows[self.penalized[rows]]
        if len(pen):
            self.token_state.index_fill_(0, to_device(pen, torch.long, dev), 0)
            marks = [(r, ids) for r, _, ids in staged if ids and self.penalized[r]]
            if marks:
                flat_rows = np.concatenate([np.full(len(ids), r, dtype=np.int64) for r, ids in marks])
                flat_ids = np.concatenate([np.asarray(ids, dtype=np.int64) for _, ids in marks])
                ok = (flat_ids >= 0) & (flat_ids < self.vocab_size)
                self.token_state.index_put_(
                    (to_device(flat_rows[ok], torch.long, dev), to_device(flat_ids[ok], torch.long, dev)),
                    torch.full((int(ok.sum()),), PROMPT_BIT, dtype=torch.int32, device=dev))
        stop_rows = [r for r in rows.tolist() if tables[r][0]]
        if stop_rows:
            self.stop_ids, _ = self._write_table(self.stop_ids, stop_rows,
                                                 [tables[r][0] for r in stop_rows])
        begin_rows = [r for r in rows.tolist() if tables[r][2]]
        if begin_rows:
            self.begin_ids, _ = self._write_table(self.begin_ids, begin_rows,
                                                  [tables[r][2] for r in begin_rows])
        bad_rows = [r for r in rows.tolist() if tables[r][3]]
        if bad_rows:
            self.bad_ids, _ = self._write_table(self.bad_ids, bad_rows, [tables[r][3] for r in bad_rows])
        allowed_rows = [r for r in rows.tolist() if tables[r][4]]
        if allowed_rows:
            self._write_allowed(allowed_rows, [tables[r][4] for r in allowed_rows])
        bias_rows = [r for r in rows.tolist() if tables[r][1]]
        if bias_rows:
            self.bias_ids, self.bias_vals = self._write_table(
                self.bias_ids, bias_rows, [list(tables[r][1]) for r in bias_rows],
                self.bias_vals, [list(tables[r][1].values()) for r in bias_rows])

    def _write_allowed(self, rows: list[int], ids: list[list[int]]) -> None:
        """Rows of the allowed-token mask: only their ids True."""
        dev = self.device
        if self.allowed is None:
            self.allowed = torch.zeros(len(self.greedy), self.vocab_size, dtype=torch.bool, device=dev)
        self.allowed.index_fill_(0, to_device(np.array(rows, dtype=np.int64), torch.long, dev), False)
        flat_rows = np.concatenate([np.full(len(x), r, dtype=np.int64) for r, x in zip(rows, ids)])
        flat_ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids])
        self.allowed.index_put_((to_device(flat_rows, torch.long, dev), to_device(flat_ids, torch.long, dev)),
                                torch.ones(len(flat_ids), dtype=torch.bool, device=dev))

    def _write_table(self, ids_t: torch.Tensor, rows: list[int], ids: list[list[int]],
                     vals_t: Optional[torch.Tensor] = None, vals: Optional[list[list[float]]] = None):
        """Write rows of a padded id table (and its value table), widening them when a row is
        longer. Without values (token masks) padding repeats the row's first id; with values
        (logit bias) it is id 0 with value 0."""
        width = max(map(len, ids))
        if width > ids_t.shape[1]:
            grow = width - ids_t.shape[1]
            if vals_t is None:
                ids_t = torch.cat([ids_t, ids_t[:, :1].expand(-1, grow)], 1) if ids_t.shape[1] \
                    else torch.zeros(ids_t.shape[0], grow, dtype=ids_t.dtype, device=ids_t.device)
            else:
                ids_t = torch.nn.functional.pad(ids_t, (0, grow))
                vals_t = torch.nn.functional.pad(vals_t, (0, grow))
        w = ids_t.shape[1]
        rows_d = to_device(np.array(rows, dtype=np.int64), torch.long, self.device)
        fill = [[x[0]] if vals_t is None else [0] for x in ids]
        pad = np.array([x + f * (w - len(x)) for x, f in zip(ids, fill)], dtype=np.int64)
        ids_t.index_copy_(0, rows_d, to_device(pad, torch.long, self.device))
        if vals_t is not None:
            pad_v = np.array([x + [0.0] * (w - len(x)) for x in vals], dtype=np.float32)
            vals_t.index_copy_(0, rows_d, to_device(pad_v, torch.float32, self.device))
        return ids_t, vals_t

    # -- one step --------------------------------------------------------------------------------
    def metadata(self, params: list[SamplingParams], rows: np.ndarray, positions: np.ndarray,
                 tail: Optional[OutputTail] = None, prev_tokens: Optional[torch.Tensor] = None
                 ) -> SamplingMetadata:
        """What the sampler needs for rows (state rows in batch order) sampling output index
        `positions` this step: host flags by numpy indexing, device indices in one copy. `tail`
        reads the output of rows with multi-token bad words (without it they are not matched),
        `prev_tokens` holds the previous step's sampled ids it may point to."""
        return SamplingMetadata.build(self, params, rows, positions, tail, prev_tokens)

    def count_tokens(self, state_rows: torch.Tensor, tokens: torch.Tensor) -> None:
        from pagoda.sample.ops import token_counts_add_
        token_counts_add_(self.token_state, state_rows, tokens)
