"""Continuous batching under one token budget.

Each step decides {request: number of new tokens to compute}. Running requests go first (a
decode costs one token; an unfinished prompt continues its chunked prefill), then waiting ones are
admitted while the budget, --max-num-seqs and free KV blocks allow. Prefill and decode mix freely in
one step; a prompt longer than the remaining budget is prefilled in chunks over several steps
(pooling requests to an encoder are never chunked: they are read whole, alone if they must;
a decoder's are prefilled like any prompt, and pooled when their last token is computed). When a running
request needs a block and none is free, the newest running request is preempted: its blocks are
freed and it goes back to the front of the queue, to be recomputed later (its full blocks usually
survive in the prefix cache). Nothing is ever dropped.

The step goes to the worker as plain data (`SchedulerOutput`); what the worker returns comes back
through `update_from_output`, which resolves tokens, checks stop conditions and builds the
step's `EngineCoreOutput`s.
"""
from __future__ import annotations

import time
from collections import deque

import msgspec
from typing import Iterable, Optional

from pagoda.engine.encoder_cache import EncoderCacheManager
from pagoda.engine.kv_cache_manager import KVCacheManager
from pagoda.engine.messages import EngineCoreOutput, FinishReason, LogprobsLists, SchedulerStats, Tensor
from pagoda.engine.request import Request, RequestStatus
from pagoda.engine.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from pagoda.worker.outputs import ModelRunnerOutput


class Scheduler:
    def __init__(self, kv_cache_manager: KVCacheManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, structured_output=None,
                 encoder_cache: Optional[EncoderCacheManager] = None):
        self.kv = kv_cache_manager
        # pagoda.structured_output.StructuredOutputManager: grammar readiness and matchers
        self.structured_output = structured_output
        self.encoders = encoder_cache  # vision-language models: the images' encoder budget
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.mm_images_total = 0
        # what the worker knows: requests it has state for, and how many of each one's blocks
        self._known: dict[str, int] = {}
        self._preempted_since_sent: set[str] = set()
        self._finished_since_sent: set[str] = set()

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)
        self.prompt_tokens_total += req.num_prompt_tokens
        self.mm_images_total += len(req.mm_features or ())

    def finish_requests(self, request_ids: Iterable[str], reason: FinishReason) -> list[Request]:
        """End requests from outside (abort, a stop string found by the front end)."""
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            req.finish_reason = reason
            self._free(req)
            done.append(req)
        return done

    def _free(self, req: Request) -> None:
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        self.kv.free_request(req, uncache=req.finish_reason == FinishReason.ERROR)
        if req.encoder_refs:
            self.encoders.release_all(req)
        del self.requests[req.request_id]
        if req.request_id in self._known:
            del self._known[req.request_id]
            self._finished_since_sent.add(req.request_id)
        self._preempted_since_sent.discard(req.request_id)
        if self.structured_output is not None:  # structured outputs: drop its matcher
            self.structured_output.remove(req.request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, req: Request) -> None:
        self.kv.free_request(req)
        if req.encoder_refs:
            self.encoders.release_all(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        if req.request_id in self._known:
            self._known[req.request_id] = 0
            self._preempted_since_sent.add(req.request_id)

    # -- one step ---------------------------------------------------------------------------------
    def _images(self, req: Request, start: int, n: int, step) -> tuple[int, Optional[tuple]]:
        """Tokens of [start, start + n) that can run given the images they cover (see
        EncoderCacheManager.plan), and the plan to commit once the request is scheduled."""
        f = req.mm_features
        if step is None or not f or start >= f[-1].offset + f[-1].length:
            return n, None
        n, hits, new = self.encoders.plan(req, start, n, step)
        return n, (hits, new)

    def _commit_images(self, req: Request, plan, step, encoder_inputs: dict) -> None:
        if plan is not None:
            self.encoders.commit(req, *plan, step)
            if plan[1]:
                encoder_inputs[req.request_id] = plan[1]

    def schedule(self) -> SchedulerOutput:
        num: dict[Request, int] = {}
        budget = self.max_num_batched_tokens
        kv = self.kv
        bsz = kv.block_size
        i = 0
        preempted = False
        step = self.encoders.new_step() if self.encoders is not None else None
        encoder_inputs: dict[str, list[int]] = {}
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            p = req.sampling_params
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0 or (req.num_pending and p is not None and req.num_output_tokens >= p.max_tokens):
                i += 1  # nothing to compute until its in-flight token is resolved
                continue
            n, plan = self._images(req, req.num_computed_tokens, n, step)
            if n <= 0:
                i += 1  # its next image waits for room in the encoder's budget
                continue
            end = req.num_computed_tokens + n
            if not kv.num_blocks or (n == 1 and end <= len(req.block_ids) * bsz and end % bsz):
                num[req] = n  # a decode whose token fits in its last block (or no KV cache at all)
                budget -= n
                i += 1
                self._commit_images(req, plan, step, encoder_inputs)
                continue
            while not kv.allocate(req, n):
                victim = self.running.pop()  # the newest
                self._preempt(victim)
                num.pop(victim, None)
                encoder_inputs.pop(victim.request_id, None)
                preempted = True
                if victim is req:
                    break
            else:
                num[req] = n
                budget -= n
                i += 1
                self._commit_images(req, plan, step, encoder_inputs)
        so = self.structured_output
        compiling: list[Request] = []  # structured outputs: grammar not compiled yet, not admitted
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.num_pending:
                break  # preempted with a token still in flight: back next step
            if so is not None and not so.is_ready(req.request_id):
                compiling.append(self.waiting.popleft())
                continue
            # prompt logprobs need logits for every prompt position: no prefix reuse for them;
            # nor for a decoder reading audio (its KV depends on the audio, not only the tokens)
            cached = ([] if (req.needs_prompt_logprobs or not kv.num_blocks or req.has_encoder_input)
                      else kv.find_cached_prefix(req))
            n = req.num_tokens - req.num_computed_tokens - len(cached) * bsz
            # the encoder runs in the step that first sends the request: its positions are paid here
            enc = req.num_encoder_tokens if req.encoder_features is not None else 0
            if enc and enc + n > budget and num:
                break  # wait for a step with room for the encoder (alone, if it is that long)
            if req.is_pooling and not kv.num_blocks:  # an encoder (no KV cache to resume from)
                if n > budget and num:
                    break  # read whole: wait for a step with room (alone, if it is that long)
            else:
                n = min(n, max(budget - enc, 1))
            n, plan = self._images(req, req.num_computed_tokens + len(cached) * bsz, n, step)
            if n <= 0:
                break  # its first image waits for room in the encoder's budget
            if kv.num_blocks and not kv.allocate(req, n, cached):
                break
            self._commit_images(req, plan, step, encoder_inputs)
            self.waiting.popleft()
            if cached and req.num_preemptions == 0:
                req.num_cached_tokens = max(req.num_cached_tokens, len(cached) * bsz)
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.time()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            num[req] = n
            budget -= n + enc
        self.waiting.extendleft(reversed(compiling))
        return self._output(num, encoder_inputs)

    def unsend_finished(self, request_ids: set[str]) -> None:
        """A step that was scheduled but will not run: the worker learns these with the next."""
        self._finished_since_sent |= request_ids

    def _output(self, num: dict[Request, int], encoder_inputs: Optional[dict] = None) -> SchedulerOutput:
        out = SchedulerOutput()
        if num:  # a step that runs tells the worker; an empty one would lose them (rows leak)
            out.finished_req_ids, self._finished_since_sent = self._finished_since_sent, set()
        if self.encoders is not None:
            out.encoder_inputs = encoder_inputs or {}
            out.free_encoder_hashes = self.encoders.take_freed()
        cached = out.scheduled_cached_reqs
        for req, n in num.items():
            rid = req.request_id
            out.num_scheduled_tokens[rid] = n
            out.total_num_scheduled_tokens += n
            sent = self._known.get(rid)
            if sent is None:
                out.scheduled_new_reqs.append(NewRequestData(
                    rid, req.prompt_token_ids, req.sampling_params, req.pooling_params,
                    list(req.block_ids), req.num_computed_tokens, req.token_type_ids, req.mm_features,
                    req.encoder_features))
                req.encoder_features = None  # the worker keeps what the encoder makes of them
                if req.mm_features:  # the worker keeps the processor outputs from here on
                    req.mm_features = [msgspec.structs.replace(f, data={}) for f in req.mm_features]
            else:
                resumed = rid in self._preempted_since_sent
                self._preempted_since_sent.discard(rid)
                cached.req_ids.append(rid)
                cached.resumed_from_preemption.append(resumed)
                cached.new_block_ids.append(list(req.block_ids[sent:]))
                cached.num_computed_tokens.append(req.num_computed_tokens)
            self._known[rid] = len(req.block_ids)
        return out

    def on_launched(self, sched: SchedulerOutput) -> None:
        """The step is on the device: count its tokens as computed; each request that samples a
        token gets a placeholder until `update_from_output` brings its value."""
        for rid, n in sched.num_scheduled_tokens.items():
            req = self.requests.get(rid)
            if req is None:  # finished while the step launched (structured outputs' deferred fill)
                continue
            req.num_computed_tokens += n
            if req.num_computed_tokens >= req.num_tokens and not req.is_pooling:
                req.num_pending += 1
            if req.encoder_refs:
                self.encoders.release_passed(req)

    # -- results ----------------------------------------------------------------------------------
    def update_from_output(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Resolve a launched step: new tokens, stop checks, finished requests, outputs."""
        outputs: dict[str, EngineCoreOutput] = {}
        so_reqs = self.structured_output.requests if self.structured_output is not None else None

        def out_for(req: Request) -> EngineCoreOutput:
            o = outputs.get(req.request_id)
            if o is None:
                o = outputs[req.request_id] = EngineCoreOutput(
                    req.request_id, [], num_cached_tokens=req.num_cached_tokens,
                    num_preemptions=req.num_preemptions)
                if not req.reported_scheduled and req.first_scheduled_time is not None:
                    req.reported_scheduled = True
                    o.first_scheduled_time = req.first_scheduled_time
            return o

        for rid, rows in result.prompt_logprobs.items():
            req = self.requests.get(rid)
            if req is not None:
                o = out_for(req)
                if o.new_prompt_logprobs is None:
                    o.new_prompt_logprobs = rows
                else:
                    o.new_prompt_logprobs.extend(rows)
        so_ids: list[str] = []
        so_toks: list[int] = []
        for k, rid in enumerate(result.req_ids):
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue  # finished (or aborted) before this token: it never existed
            tok = result.sampled_token_ids[k]
            req.num_pending -= 1
            req.all_token_ids.append(tok)
            if so_reqs and rid in so_reqs:  # structured outputs: its matcher advances below
                so_ids.append(rid)
                so_toks.append(tok)
            self.generation_tokens_total += 1
            o = out_for(req)
            o.new_token_ids.append(tok)
            if result.logprobs is not None and req.sampling_params.logprobs is not None:
                lp = result.logprobs
                row = LogprobsLists([lp.token_ids[k]], [lp.logprobs[k]], [lp.ranks[k]])
                if o.new_logprobs is None:
                    o.new_logprobs = row
                else:
                    o.new_logprobs.extend(row)
            self.kv.register_full_blocks(req, req.num_computed_tokens)
            reason, stop = self._check_stop(req, tok)
            if reason is not None:
                req.finish_reason, req.stop_reason = reason, stop
                o.finish_reason, o.stop_reason = reason, stop
                self._free(req)
        if so_ids:  # every matcher in one call (a finished request's is gone already)
            self.structured_output.accept_tokens(so_ids, so_toks)
        for rid, vec in result.pooler_output.items():
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            o = out_for(req)
            o.pooling_output = Tensor.of(vec)
            o.finish_reason = req.finish_reason = FinishReason.STOP
            self._free(req)
        for rid, err in result.failed.items():
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            o = out_for(req)
            o.finish_reason = req.finish_reason = FinishReason.ERROR
            o.error = err
            self._free(req)
        return list(outputs.values())

    def _check_stop(self, req: Request, tok: int) -> tuple[Optional[FinishReason], Optional[int]]:
        p = req.sampling_params
        n_out = len(req.all_token_ids) - req.num_prompt_tokens
        min_ok = n_out >= p.min_tokens
        if min_ok and not p.ignore_eos and tok in p.eos_token_ids:
            return FinishReason.STOP, None
        if min_ok and tok in p.stop_token_ids:
            return FinishReason.STOP, tok
        if n_out >= p.max_tokens or len(req.all_token_ids) >= self.max_model_len:
            return FinishReason.LENGTH, None
        return None, None

    def stats(self) -> SchedulerStats:
        kv = self.kv
        s = SchedulerStats(len(self.running), len(self.waiting), kv.usage(), kv.num_blocks,
                           kv.queries, kv.hits, self.num_preemptions, self.prompt_tokens_total,
                           self.generation_tokens_total)
        if self.encoders is not None:
            e = self.encoders
            s.mm_images_total, s.encoder_cache_queries = self.mm_images_total, e.queries
            s.encoder_cache_hits, s.images_encoded_total = e.hits, e.encoded
        return s
