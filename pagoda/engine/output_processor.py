"""Engine-core outputs -> RequestOutputs, in the front end (the API server process, or the
offline LLM's): incremental detokenization, stop strings, logprob dicts, per-request metrics,
and the deltas streaming responses send.

A stop string is found here, not in the engine core: the request is finished at once and its
id returned for aborting in the engine core (a token computed after the stop is dropped). A
request with n > 1 samples ran as n engine requests; their outputs are merged back into one
RequestOutput with one CompletionOutput per sample.
"""
from __future__ import annotations

from typing import Any, Optional

from pagoda.engine.detokenizer import IncrementalDetokenizer, decode_token
from pagoda.engine.messages import EngineCoreOutput, FinishReason
from pagoda.outputs import (CompletionOutput, EmbeddingOutput, Logprob, PoolingOutput,
                            PoolingRequestOutput, RequestMetrics, RequestOutput)
from pagoda.pooling_params import PoolingParams
from pagoda.sampling_params import SamplingParams
from pagoda.sample.logprobs import LogprobsLists


class RequestFailedError(RuntimeError):
    """One request failed inside the engine (its neighbours in the batch went on)."""


class _Sample:
    """One engine request: one sample of a parent request."""

    def __init__(self, parent: "_Parent", index: int, tokenizer, params: SamplingParams):
        self.parent = parent
        self.index = index
        self.params = params
        self.token_ids: list[int] = []
        self.logprobs: Optional[list[dict[int, Logprob]]] = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: Optional[str] = None
        self.stop_reason: Optional[int | str] = None
        self.detok = None
        if tokenizer is not None:
            self.detok = IncrementalDetokenizer(tokenizer, parent.prompt_token_ids,
                                                params.skip_special_tokens, params.stop,
                                                params.include_stop_str_in_output)
        # what has been reported already (streaming deltas)
        self.sent_text = 0
        self.sent_tokens = 0
        self.sent_logprobs = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _Parent:
    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                 params, arrival_time: float):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.samples: list[_Sample] = []
        self.engine_ids: list[str] = []  # one engine request per sample
        self.metrics = RequestMetrics(arrival_time=arrival_time, num_prompt_tokens=len(prompt_token_ids))
        self.prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = (
            [None] if isinstance(params, SamplingParams) and params.prompt_logprobs is not None else None)
        self.error: Optional[str] = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer: Optional[Any]):
        self.tokenizer = tokenizer
        self.parents: dict[str, _Parent] = {}
        self.by_engine_id: dict[str, _Sample] = {}
        # requests the engine failed, with why: the caller raises for them (pop as it reads);
        # `invalid`: those whose failure is the request's own (a grammar that compiled too long)
        self.failed: dict[str, str] = {}
        self.invalid: set[str] = set()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.parents

    def add_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                    params, engine_ids: list[str], arrival_time: float) -> None:
        parent = _Parent(request_id, prompt, prompt_token_ids, params, arrival_time)
        if isinstance(params, PoolingParams):
            parent.samples = [_Sample(parent, 0, None, SamplingParams(max_tokens=None))]
        else:
            parent.samples = [_Sample(parent, i, self.tokenizer, params) for i in range(len(engine_ids))]
        self.parents[request_id] = parent
        parent.engine_ids = list(engine_ids)
        for eid, s in zip(engine_ids, parent.samples):
            self.by_engine_id[eid] = s

    def abort_request(self, request_id: str) -> tuple[list[str], Optional[RequestOutput]]:
        """Forget a request; returns its engine ids (to abort in the engine core) and its last
        output (finish_reason "abort")."""
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return [], None
        ids = [eid for eid in parent.engine_ids if eid in self.by_engine_id]
        for eid in ids:
            del self.by_engine_id[eid]
        for s in parent.samples:
            if not s.finished:
                s.finish_reason = "abort"
        return ids, (self._output(parent) if not isinstance(parent.params, PoolingParams) else None)

    # -- one step's outputs ---------------------------------------------------------------------
    def process_outputs(self, outputs: list[EngineCoreOutput], timestamp: float,
                        final_only: bool = False) -> tuple[list, list[str]]:
        """Returns (outputs of the requests this step touched, engine ids to abort); with
        `final_only`, of the requests that finished (offline generate builds no per-step outputs)."""
        touched: dict[str, _Parent] = {}
        to_abort: list[str] = []
        for eo in outputs:
            s = self.by_engine_id.get(eo.request_id)
            if s is None:
                continue  # aborted meanwhile
            parent = s.parent
            touched[parent.request_id] = parent
            m = parent.metrics
            if eo.first_scheduled_time is not None and m.first_scheduled_time is None:
                m.first_scheduled_time = eo.first_scheduled_time
            m.num_cached_tokens = max(m.num_cached_tokens, eo.num_cached_tokens)
            m.num_preemptions = max(m.num_preemptions, eo.num_preemptions)
            if eo.pooling_output is not None:
                parent.pooled = eo.pooling_output.numpy()
            if eo.new_prompt_logprobs is not None:
                self._add_prompt_logprobs(parent, eo.new_prompt_logprobs)
            if eo.new_token_ids:
                if m.first_token_time is None:
                    m.first_token_time = timestamp
                m.last_token_time = timestamp
                self._add_tokens(s, eo, to_abort)
            if eo.finish_reason is not None and not s.finished:
                s.finish_reason = str(eo.finish_reason)
                s.stop_reason = eo.stop_reason
                if eo.finish_reason == FinishReason.ERROR:
                    parent.error = eo.error or "the engine could not run this request"
                    self.failed[parent.request_id] = parent.error
                    if eo.invalid_request:
                        self.invalid.add(parent.request_id)
            if s.finished:
                self.by_engine_id.pop(eo.request_id, None)
        results = []
        for rid, parent in touched.items():
            if parent.finished:
                parent.metrics.finished_time = timestamp
                self.parents.pop(rid, None)
            elif final_only:
                continue
            results.append(self._result(parent))
        return results, to_abort

    def _add_tokens(self, s: _Sample, eo: EngineCoreOutput, to_abort: list[str]) -> None:
        p = s.params
        lp = eo.new_logprobs
        for j, tok in enumerate(eo.new_token_ids):
            if s.finished:
                break
            s.token_ids.append(tok)
            if s.logprobs is not None and lp is not None and j < len(lp.token_ids):
                self._add_logprobs(s, lp, j)
            if s.detok is not None:
                min_ok = len(s.token_ids) >= p.min_tokens
                hit = s.detok.add_token(tok, check_stop=min_ok)
                if hit is not None:
                    s.finish_reason, s.stop_reason = "stop", hit
                    if eo.finish_reason is None:
                        to_abort.append(eo.request_id)

    def _decoded(self, tid: int) -> Optional[str]:
        return decode_token(self.tokenizer, tid) if self.tokenizer is not None else None

    def _row(self, ids: list[int], vals: list[float], rank: int) -> dict[int, Logprob]:
        """One position's logprobs: the chosen (or actual) token first, then the top-k by rank.
        Runs per token of every logprobs request: one indexed loop, no slices."""
        d = {ids[0]: Logprob(vals[0], rank, self._decoded(ids[0]))}
        for r in range(1, len(ids)):
            if ids[r] not in d:
                d[ids[r]] = Logprob(vals[r], r, self._decoded(ids[r]))
        return d

    def _add_logprobs(self, s: _Sample, lp: LogprobsLists, j: int) -> None:
        s.logprobs.append(self._row(lp.token_ids[j], lp.logprobs[j], lp.ranks[j]))
        s.cumulative_logprob += lp.logprobs[j][0]

    def _add_prompt_logprobs(self, parent: _Parent, rows: LogprobsLists) -> None:
        if parent.prompt_logprobs is not None:
            parent.prompt_logprobs += [self._row(*row) for row in zip(rows.token_ids, rows.logprobs,
                                                                      rows.ranks)]

    # -- outputs --------------------------------------------------------------------------------
    def _result(self, parent: _Parent):
        if isinstance(parent.params, PoolingParams):
            return PoolingRequestOutput(parent.request_id, PoolingOutput(getattr(parent, "pooled", None)),
                                        parent.prompt_token_ids, parent.finished, parent.metrics)
        return self._output(parent)

    def _output(self, parent: _Parent) -> RequestOutput:
        outs = []
        deltas_text, deltas_tok, deltas_lp = {}, {}, {}
        for s in parent.samples:
            i = s.index
            if s.detok is not None:
                text = s.detok.text
                stable = s.detok.stable_len(s.finished)
                deltas_text[i] = text[s.sent_text:stable]
                s.sent_text = max(s.sent_text, stable)
                text_out = text if s.finished else text[:stable]
            else:
                text_out, deltas_text[i] = "", ""
            deltas_tok[i] = s.token_ids[s.sent_tokens:]
            s.sent_tokens = len(s.token_ids)
            if s.logprobs is not None:
                deltas_lp[i] = s.logprobs[s.sent_logprobs:]
                s.sent_logprobs = len(s.logprobs)
            outs.append(CompletionOutput(i, text_out, s.token_ids,
                                         s.cumulative_logprob if s.logprobs is not None else None,
                                         s.logprobs, s.finish_reason, s.stop_reason))
        m = parent.metrics
        m.num_generation_tokens = sum(len(s.token_ids) for s in parent.samples)
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outs,
                             parent.finished, parent.prompt_logprobs, m, m.num_cached_tokens,
                             deltas_text, deltas_tok, deltas_lp)


def embedding_output(out: PoolingRequestOutput) -> "EmbeddingOutput":
    return EmbeddingOutput(out.outputs.data.tolist())
