"""One batched sampler for every setting, with no per-request Python loop and no host sync.

In vLLM's order, on logits the runner has already masked for structured outputs
(pagoda.sample.grammar_bitmask): raw logprobs (of the model's distribution, before anything
below, as vLLM reports them by default); allowed_token_ids (every other token masked) and bad
words (pagoda.sample.bad_words); min_tokens (stop and EOS masked), begin-suppressed tokens (never
the first output token) and logit bias; repetition, frequency and presence penalties; greedy rows
take the argmax of that; random
rows divide by their temperature and draw from min-p, then top-k, then top-p, with the row
sampler of pagoda.kernels.sampling (exact rejection sampling, no sort of the vocabulary: rows with
top-k draw among their torch.topk candidates). Each operation runs once for all the rows that
need it, on index tensors from `SamplingMetadata`; per-request parameters and token counts live
in `SamplingState` on the device. Sampled ids and logprobs stay on the device: the caller copies
them back behind the step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pagoda.sample import ops
from pagoda.sample.bad_words import apply_bans_
from pagoda.sample.logprobs import LogprobsTensors
from pagoda.sample.metadata import SamplingMetadata
from pagoda.sample.state import FREQUENCY, INV_TEMP, MIN_P, PRESENCE, REPETITION, TOP_P


@dataclass
class SampleResult:
    token_ids: torch.Tensor                    # int64 [rows], on the logits' device
    logprobs: Optional[LogprobsTensors] = None  # one row per meta.logprobs row, on the device
    logprobs_rows: Optional[np.ndarray] = None  # their batch indices
    logprobs_keep: Optional[list[int]] = None   # and how many alternatives each asked for


class Sampler:
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SampleResult:
        """Next token per row of logits [rows, vocab] (modified in place)."""
        with ops.one_thread_on_cpu(logits):
            return self._sample(logits, meta)

    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> SampleResult:
        if meta.all_plain_greedy:
            return SampleResult(logits.argmax(dim=-1))
        st, d = meta.state, meta.dev
        n = logits.shape[0]
        x = self.processed_logits(logits, meta)
        if meta.greedy.any():
            tokens = x.argmax(dim=-1)
        else:
            tokens = torch.empty(n, dtype=torch.long, device=x.device)
        if len(meta.full) or len(meta.cand):
            self._sample_random(x, meta, tokens)
        res = SampleResult(tokens)
        if len(meta.logprobs):
            sel = meta.logprobs
            keep = st.num_logprobs[meta.rows[sel]]
            every = len(sel) == n
            raw = logits if every else logits.index_select(0, d["logprobs"])
            chosen = tokens if every else tokens.index_select(0, d["logprobs"])
            res.logprobs = ops.logprobs_topk(raw, chosen, int(keep.max()))
            res.logprobs_rows, res.logprobs_keep = sel, keep.tolist()
        if len(meta.penalized):  # last: a step that fails before here counts nothing
            st.count_tokens(d["penalized_rows"], tokens.index_select(0, d["penalized"]))
        return res

    @staticmethod
    def processed_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """The logits the rows sample from: masked, biased and penalised (`logits` itself when
        nothing changes them; a copy when logprobs must still read the raw ones)."""
        st, d = meta.state, meta.dev
        x = logits
        if (len(meta.penalized) or len(meta.biased) or len(meta.stopped) or len(meta.suppressed)
                or len(meta.allowed) or len(meta.banned) or meta.bans is not None):
            x = logits.float()
            if x is logits and len(meta.logprobs):
                x = logits.clone()  # logprobs read the raw logits after sampling
        if len(meta.allowed):
            every = len(meta.allowed) == x.shape[0]
            keep = st.allowed.index_select(0, d["allowed_rows"])
            if every:
                x.masked_fill_(~keep, float("-inf"))
            else:
                i = d["allowed"]
                x.index_copy_(0, i, x.index_select(0, i).masked_fill_(~keep, float("-inf")))
        if len(meta.banned):
            ops.forbid_tokens_(x, d["banned"], st.bad_ids.index_select(0, d["banned_rows"]))
        if meta.bans is not None:
            apply_bans_(x, meta.bans, d, meta.prev_tokens)
        if len(meta.stopped):
            ops.forbid_tokens_(x, d["stopped"], st.stop_ids.index_select(0, d["stopped_rows"]))
        if len(meta.suppressed):
            ops.forbid_tokens_(x, d["suppressed"], st.begin_ids.index_select(0, d["suppressed_rows"]))
        if len(meta.biased):
            rows = d["biased_rows"]
            ops.add_logit_bias_(x, d["biased"], st.bias_ids.index_select(0, rows),
                                st.bias_vals.index_select(0, rows))
        if len(meta.penalized):
            prm = st.params.index_select(0, d["penalized_rows"])
            ops.apply_penalties_(x, st.token_state, d["penalized"], d["penalized_rows"],
                                 prm[:, REPETITION], prm[:, FREQUENCY], prm[:, PRESENCE])
        return x

    @staticmethod
    def _candidates(x: torch.Tensor, k: np.ndarray, k_dev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's k best logits and their token ids, in token-id order (the draw walks its
        row in order, so the order must not depend on the batch), first k[i] columns valid."""
        kmax = int(k.max())
        vals, ids = x.topk(kmax, dim=-1, sorted=bool((k != kmax).any()))
        if (k != kmax).any():  # sorted best first: columns past a row's own k go last
            cols = torch.arange(kmax, device=x.device)
            ids = torch.where(cols[None, :] < k_dev[:, None], ids, x.shape[1] + cols[None, :])
        ids, order = ids.sort(dim=-1)
        return vals.gather(1, order), ids

    @staticmethod
    def _sample_random(x: torch.Tensor, meta: SamplingMetadata, tokens: torch.Tensor) -> None:
        st, d = meta.state, meta.dev
        prm = st.params.index_select(0, d["rows"])
        seeds = st.seeds.index_select(0, d["rows"])
        pos = d["positions"]
        seed_host = st.seed[meta.rows]
        top_p, min_p = st.top_p[meta.rows], st.min_p[meta.rows]
        for name, sel in (("full", meta.full), ("cand", meta.cand)):
            if not len(sel):
                continue
            i = d[name]
            every = len(sel) == x.shape[0]
            if name == "full":
                vals, index, width, ids = x, i, d["full_width"], None
            else:
                vals, ids = Sampler._candidates(x if every else x.index_select(0, i),
                                             st.top_k[meta.rows[sel]], d["cand_k"])
                index, width = torch.arange(len(sel), device=x.device), d["cand_k"]
            p = prm if every else prm.index_select(0, i)
            col = ops.sample_rows(
                vals, index, width, p[:, INV_TEMP], p[:, MIN_P], p[:, TOP_P],
                seeds if every else seeds.index_select(0, i), pos if every else pos.index_select(0, i),
                seed_host[sel], meta.positions[sel], use_top_p=bool((top_p[sel] < 1).any()),
                use_min_p=bool((min_p[sel] > 0).any()))
            tok = col if ids is None else ids.gather(1, col[:, None]).squeeze(1)
            if every:
                tokens.copy_(tok)
            else:
                tokens.index_copy_(0, i, tok)
