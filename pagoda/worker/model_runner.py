"""Turns one scheduled step into tensors, runs the model, samples or pools.

The scheduler's plain-data step (`engine.scheduler_output.SchedulerOutput`, read here by its
fields only: the worker imports nothing from the engine) updates the persistent per-request
state (`InputBatch`); the step's inputs are then gathered for all scheduled rows at once: the
new tokens of every request back to back, their positions, the cache slot each new K/V goes to,
block tables, query start offsets and KV lengths — the attention metadata, built here and only
here. Logits are computed only for rows that need them (the last token of each request that
finished its prompt, plus every prompt row of requests asking for prompt logprobs); pooling
requests end in the pooler instead. An encoder-decoder model (Whisper) runs its encoder once for
each new request that brings audio features, in the step that first schedules it, and keeps the
result's cross-attention K/V in the request's batch row (`worker.cross_attention`).

Vision-language models: the step's images are encoded first (encoder_runner.py) and their rows
replace the placeholders' token embeddings; M-RoPE models get their [3, T] rotary positions.

`launch` queues a step and returns without waiting for its sampled ids (they stay on the
device; the next step reads its inputs from there); `PendingStep.result()` waits for them, and
for the step's logprobs, which are computed on the device and copied back with the ids: no
sampling setting makes a step wait for the device.
If a step fails, its requests are run one by one so only a request that fails on its own is
failed (`ModelRunnerOutput.failed`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pagoda.layers.attention import AttentionMetadata, set_attention_metadata
from pagoda.layers.pooler import Pooler
from pagoda.layers.quantization.kv_cache import KVCacheFormat
from pagoda.sample import ops as sample_ops
from pagoda.sample.logprobs import LogprobsLists, LogprobsTensors
from pagoda.sample.grammar_bitmask import apply_token_bitmask
from pagoda.sample.metadata import SamplingMetadata
from pagoda.sample.ops import to_device
from pagoda.sample.sampler import Sampler
from pagoda.worker import kv_cache as kvc
from pagoda.worker.encoder_runner import EncoderRunner
from pagoda.worker.input_batch import PLACEHOLDER, CachedRequestState, InputBatch
from pagoda.worker.outputs import ModelRunnerOutput

logger = logging.getLogger("pagoda.model_runner")


@dataclass
class _StepInputs:
    """One step laid out: row order, per-row counts, the flat token arrays (host)."""
    req_ids: list[str]
    rows: np.ndarray          # InputBatch rows in batch order
    num_sched: np.ndarray     # tokens this step, per row
    cu: np.ndarray            # cumulative num_sched (query ends)
    computed: np.ndarray      # tokens already in the KV cache, per row
    input_ids: np.ndarray     # [T]
    positions: np.ndarray     # [T]
    pend_dst: np.ndarray      # flat rows whose input id is on the device (previous step's sample)
    pend_src: np.ndarray      # their rows in the previous step's sampled tensor
    decode_only: bool


@dataclass
class _HostLogprobs:
    """A step's logprob rows on their way to the host, and how to cut them into lists."""
    sampled: Optional[LogprobsTensors] = None   # one row per logprobs-returning sampled row
    sampled_rows: Optional[np.ndarray] = None   # their indices in req_ids
    sampled_keep: Optional[list[int]] = None    # top-k alternatives each keeps
    prompt: Optional[LogprobsTensors] = None    # prompt positions of every request, back to back
    prompt_parts: Optional[list[tuple[str, int, int]]] = None  # (req_id, rows, top-k alternatives)

    def resolve(self, out: ModelRunnerOutput) -> None:
        if self.prompt is not None:
            start = 0
            for rid, m, k in self.prompt_parts:
                out.prompt_logprobs[rid] = self.prompt.lists([k] * m, start)
                start += m
        if self.sampled is not None:
            got = self.sampled.lists(self.sampled_keep)
            n = len(out.req_ids)
            lps = LogprobsLists([[] for _ in range(n)], [[] for _ in range(n)], [0] * n)
            for i, r in enumerate(self.sampled_rows.tolist()):
                lps.token_ids[r], lps.logprobs[r], lps.ranks[r] = \
                    got.token_ids[i], got.logprobs[i], got.ranks[i]
            out.logprobs = lps


class PendingStep:
    """A launched step: its sampled ids (and logprobs) are being copied into pinned host memory
    behind the GPU work; result() waits for that copy only (the step's event), not for later
    launches."""

    def __init__(self, runner: "ModelRunner", output: ModelRunnerOutput,
                 host: Optional[torch.Tensor], event, placeholders: list[tuple[str, int]],
                 logprobs: Optional[_HostLogprobs] = None, encoder_timings: Optional[list] = None):
        self.runner = runner
        self.output = output
        self.host = host              # int64 [len(req_ids)]: pinned (CUDA) or the tokens (CPU)
        self.event = event
        self.placeholders = placeholders  # (req_id, output index) of each sampled token
        self.logprobs = logprobs
        self.encoder_timings = encoder_timings  # the vision encoder's runs in this step

    def result(self) -> ModelRunnerOutput:
        if self.event is not None:
            self.event.synchronize()
        out = self.output
        if self.logprobs is not None:
            self.logprobs.resolve(out)
            self.logprobs = None
        if self.encoder_timings:
            out.encoder_seconds = EncoderRunner.seconds(self.encoder_timings)
            self.encoder_timings = None
        if out.req_ids and not out.sampled_token_ids:
            out.sampled_token_ids = self.host.tolist()
            batch = self.runner.batch
            for (rid, idx), tok in zip(self.placeholders, out.sampled_token_ids):
                batch.set_token(rid, idx, tok)
        return out


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config, device: torch.device, dtype: torch.dtype,
                 block_size: int, max_num_seqs: int, max_model_len: int, seed: int = 0,
                 pooler: Optional[Pooler] = None, kv_cache_dtype: str = "auto"):
        self.model = model
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.pooler = pooler
        self.on_cuda = device.type == "cuda"
        self.sampler = Sampler()
        attn = model.attention_layers()
        self.num_layers = len(attn)
        self.num_kv_heads = attn[0].num_kv_heads if attn else 0
        self.head_dim = attn[0].head_dim if attn else 0
        self.kv_format = KVCacheFormat(kv_cache_dtype, dtype, self.num_kv_heads, self.head_dim)
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.batch = InputBatch(max_num_seqs, max_model_len, -(-max_model_len // block_size),
                                0 if pooler is not None else config.vocab_size, device, seed)
        self.cross = None  # worker.cross_attention.CrossAttentionStore (encoder-decoder models)
        if getattr(model, "is_encoder_decoder", False):
            from pagoda.worker.cross_attention import CrossAttentionStore
            self.cross = CrossAttentionStore(model, max_num_seqs, dtype, device)
        self.cpu_decoder = None   # worker.cpu_decode.CpuDecoder: decode steps in one C call a layer
        self.graph_runner = None  # worker.cuda_graphs.CudaGraphRunner: decode steps from CUDA graphs
        # vision-language models: the image encoder, its output cache, M-RoPE positions
        self.encoders = (EncoderRunner(model, device, dtype)
                         if getattr(model, "supports_multimodal", False) else None)
        # the previous launch's sampled ids (device) and, per request, its row in that tensor:
        # the next step's placeholder inputs come from there
        self.prev_tokens: Optional[torch.Tensor] = None
        self._prev_rows: dict[str, int] = {}
        # pinned landing buffers for sampled ids, two in turn: buffer k is rewritten at step k+2,
        # and the engine has read step k's ids back before it launches step k+2
        self._out_bufs: list[torch.Tensor] = []
        self._launches = 0
        self.grammar = None  # the step's structured-outputs bitmask (SchedulerOutput.grammar)

    @property
    def has_kv_cache(self) -> bool:
        return self.num_layers > 0

    # -- KV cache -------------------------------------------------------------------------------
    def block_bytes(self) -> int:
        return self.kv_format.block_bytes(self.num_layers, self.block_size)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        caches = kvc.allocate_kv_cache(self.kv_format, self.num_layers, num_blocks, self.block_size,
                                       self.device)
        self.kv_caches = [c for c, _ in caches]
        for layer, (cache, quant) in zip(self.model.attention_layers(), caches):
            layer.kv_cache, layer.kv_quant = cache, quant
        self.num_blocks = num_blocks
        self.cpu_decoder = None
        if self.device.type == "cpu" and self.dtype == torch.float32 and num_blocks:
            from pagoda.worker.cpu_decode import CpuDecoder
            self.cpu_decoder = CpuDecoder.build(self.model)

    @torch.inference_mode()
    def profile_peak_memory(self, num_tokens: int, max_model_len: int, max_num_seqs: int) -> int:
        """Peak CUDA memory of one max-size step (prefill of num_tokens tokens, logits for up to
        max_num_seqs rows), run against a throwaway cache just big enough for it."""
        per_seq = min(num_tokens, max_model_len)
        nseq = -(-num_tokens // per_seq)
        blocks_per_seq = -(-per_seq // self.block_size)
        if self.has_kv_cache:
            self.allocate_kv_cache(nseq * blocks_per_seq)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        ids = torch.randint(0, self.config.vocab_size, (num_tokens,), device=self.device)
        lens = [min(per_seq, num_tokens - i * per_seq) for i in range(nseq)]
        qsl = [0]
        for n in lens:
            qsl.append(qsl[-1] + n)
        pos = torch.cat([torch.arange(n, device=self.device) for n in lens])
        bt = torch.arange(nseq * blocks_per_seq, dtype=torch.int32, device=self.device).view(nseq, -1)
        slots = torch.cat([i * blocks_per_seq * self.block_size + torch.arange(n, device=self.device)
                           for i, n in enumerate(lens)])
        meta = AttentionMetadata(slots, torch.tensor(qsl, dtype=torch.int32, device=self.device),
                                 torch.tensor(lens, dtype=torch.int32, device=self.device), bt,
                                 max(lens), max(lens), qsl, lens)
        if self.cross is not None:  # every sequence reads the first row's (throwaway) K/V
            meta.cross_rows = torch.zeros(nseq, dtype=torch.long, device=self.device)
        set_attention_metadata(meta)
        try:
            h = self.model(ids, pos)
            if self.pooler is None:  # pooling models compute no logits
                rows = torch.arange(min(max_num_seqs, num_tokens), device=self.device)
                torch.softmax(self.model.compute_logits(h[rows]).float(), dim=-1)
            torch.cuda.synchronize()
        finally:
            set_attention_metadata(None)
        peak = torch.cuda.max_memory_allocated(self.device)
        del h
        self.kv_caches = []
        for layer in self.model.attention_layers():
            layer.kv_cache, layer.kv_quant = torch.empty(0), None
        torch.cuda.empty_cache()
        return peak

    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int, capture: bool = True) -> None:
        from pagoda.worker.cuda_graphs import CudaGraphRunner
        self.graph_runner = CudaGraphRunner(self.model, self.device, max_num_seqs, max_model_len,
                                            self.block_size, capture=capture)
        self.graph_runner.capture()

    # -- per-request state ------------------------------------------------------------------------
    def _update_states(self, sched, failed: dict[str, str]) -> None:
        batch = self.batch
        enc = self.encoders
        for rid in sched.finished_req_ids:
            batch.remove(rid)
            self._prev_rows.pop(rid, None)
            if enc is not None:
                enc.remove_request(rid)
        if enc is not None:
            enc.free(getattr(sched, "free_encoder_hashes", ()))
        encode: list[tuple[str, np.ndarray]] = []
        for new in sched.scheduled_new_reqs:
            try:
                if enc is not None:
                    enc.add_request(new.req_id, new.prompt_token_ids, getattr(new, "mm_features", None))
                batch.add(CachedRequestState(new.req_id, new.prompt_token_ids, new.sampling_params,
                                             new.pooling_params, list(new.block_ids),
                                             new.num_computed_tokens, new.token_type_ids))
                features = getattr(new, "encoder_features", None)
                if features is not None:
                    if self.cross is None:
                        raise ValueError("audio features sent to a model without an encoder")
                    encode.append((new.req_id, features))
            except Exception as e:  # this request cannot be prepared: it alone fails
                logger.exception("request %s could not be added to the batch", new.req_id)
                failed[new.req_id] = f"{type(e).__name__}: {e}"
        if encode:
            self._encode(encode, failed)
        c = sched.scheduled_cached_reqs
        for rid, resumed, blocks, computed in zip(c.req_ids, c.resumed_from_preemption,
                                                  c.new_block_ids, c.num_computed_tokens):
            state = batch.requests[rid]
            state.num_computed_tokens = computed
            batch.num_computed_tokens[batch.row_of[rid]] = computed
            if resumed:
                state.block_ids = list(blocks)
                batch.set_blocks(rid, state.block_ids)
            else:
                state.block_ids.extend(blocks)
                batch.append_blocks(rid, blocks)
        if batch.sampling is not None:
            batch.sampling.flush()  # the new rows' sampling state, for all of them at once

    def _encode(self, reqs: list[tuple[str, np.ndarray]], failed: dict[str, str]) -> None:
        """The encoder over these new requests' features at once; if that fails, one by one, so
        only a request that fails on its own is failed."""
        batch = self.batch
        try:
            self.cross.fill([batch.row_of[r] for r, _ in reqs], [f for _, f in reqs])
            return
        except Exception:
            if len(reqs) > 1:
                logger.exception("encoder over %d requests failed; running them one by one", len(reqs))
        for rid, f in reqs:
            try:
                self.cross.fill([batch.row_of[rid]], [f])
            except Exception as e:
                logger.exception("request %s failed in the encoder", rid)
                failed[rid] = f"{type(e).__name__}: {e}"

    # -- inputs ---------------------------------------------------------------------------------
    def _inputs(self, req_ids: list[str], num_sched: list[int]) -> _StepInputs:
        batch = self.batch
        rows = np.fromiter((batch.row_of[r] for r in req_ids), dtype=np.int64, count=len(req_ids))
        n = np.asarray(num_sched, dtype=np.int64)
        cu = np.cumsum(n)
        computed = batch.num_computed_tokens[rows]
        total = int(cu[-1])
        starts = cu - n
        req_idx = np.repeat(np.arange(len(rows)), n)
        positions = np.arange(total, dtype=np.int64) + np.repeat(computed - starts, n)
        flat_rows = rows[req_idx]
        input_ids = batch.token_ids[flat_rows, positions].astype(np.int64)
        pend_dst, pend_src = [], []
        if self._prev_rows:
            for i, rid in enumerate(req_ids):
                src = self._prev_rows.get(rid)
                if src is not None:  # its last token is still on the device
                    last = int(cu[i]) - 1
                    if input_ids[last] == PLACEHOLDER:
                        pend_dst.append(last)
                        pend_src.append(src)
        return _StepInputs(req_ids, rows, n, cu, computed, input_ids, positions,
                           np.asarray(pend_dst, dtype=np.int64), np.asarray(pend_src, dtype=np.int64),
                           bool((n == 1).all()))

    def _attention_metadata(self, s: _StepInputs) -> AttentionMetadata:
        dev = self.device
        bs = self.block_size
        seq_lens = s.computed + s.num_sched
        qsl = np.concatenate(([0], s.cu)).astype(np.int64)
        if self.has_kv_cache:
            req_idx = np.repeat(np.arange(len(s.rows)), s.num_sched)
            blk = self.batch.block_table[s.rows[req_idx], s.positions // bs].astype(np.int64)
            slots = blk * bs + s.positions % bs
            width = int(self.batch.num_blocks[s.rows].max())
            bt = self.batch.block_table[s.rows, :max(width, 1)]
        else:
            slots = np.zeros(0, dtype=np.int64)
            bt = np.zeros((len(s.rows), 1), dtype=np.int32)
        qsl_l, sl_l = qsl.tolist(), seq_lens.tolist()
        cross_rows = to_device(s.rows, torch.long, dev) if self.cross is not None else None
        return AttentionMetadata(
            slot_mapping=to_device(slots, torch.long, dev),
            query_start_loc=to_device(qsl_l, torch.int32, dev),
            seq_lens=to_device(sl_l, torch.int32, dev),
            block_tables=to_device(bt, torch.int32, dev),
            max_query_len=int(s.num_sched.max()), max_seq_len=int(seq_lens.max()),
            query_start_loc_cpu=qsl_l, seq_lens_cpu=sl_l, cross_rows=cross_rows)

    # -- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, sched) -> PendingStep:
        """Queue one step on the device and return without waiting for it."""
        failed: dict[str, str] = {}
        self.grammar = sched.grammar  # structured outputs: applied just before the sampler
        self._update_states(sched, failed)
        req_ids = [r for r in sched.num_scheduled_tokens if r not in failed]
        if not req_ids:
            return self._finish(ModelRunnerOutput(failed=failed), [], None)
        try:
            return self._launch_rows(req_ids, [sched.num_scheduled_tokens[r] for r in req_ids], failed)
        except Exception:
            if len(req_ids) == 1:
                rid = req_ids[0]
                logger.exception("request %s failed in the model runner", rid)
                failed[rid] = self._describe_last_error()
                return self._finish(ModelRunnerOutput(failed=failed), [], None)
            logger.exception("step of %d requests failed; running them one by one", len(req_ids))
        return self._run_one_by_one(req_ids, sched, failed)

    @staticmethod
    def _describe_last_error() -> str:
        import sys
        e = sys.exc_info()[1]
        return f"{type(e).__name__}: {e}"

    def _run_one_by_one(self, req_ids: list[str], sched, failed: dict[str, str]) -> PendingStep:
        """Run a failed step's requests alone, synchronously. Recomputing a request's tokens
        writes the same K/V into the same slots, so a partly run step is safe to redo."""
        merged = ModelRunnerOutput(failed=failed)
        rows: tuple[list, list, list] = ([], [], [])
        any_logprobs = False
        for rid in req_ids:
            try:
                out = self._launch_rows([rid], [sched.num_scheduled_tokens[rid]], {}).result()
            except Exception as e:
                logger.exception("request %s failed in the model runner", rid)
                failed[rid] = f"{type(e).__name__}: {e}"
                continue
            for k, r in enumerate(out.req_ids):
                merged.req_ids.append(r)
                merged.sampled_token_ids.append(out.sampled_token_ids[k])
                lp = out.logprobs
                any_logprobs |= lp is not None
                rows[0].append(lp.token_ids[k] if lp else [])
                rows[1].append(lp.logprobs[k] if lp else [])
                rows[2].append(lp.ranks[k] if lp else 0)
            merged.prompt_logprobs.update(out.prompt_logprobs)
            merged.pooler_output.update(out.pooler_output)
            merged.encoder_seconds += out.encoder_seconds
        if any_logprobs:
            merged.logprobs = LogprobsLists(*rows)
        self._prev_rows = {}  # every token of this step is resolved already
        self.prev_tokens = None
        return self._finish(merged, [], None)

    def _launch_rows(self, req_ids: list[str], num_sched: list[int], failed: dict[str, str]) -> PendingStep:
        batch = self.batch
        s = self._inputs(req_ids, num_sched)
        dev = self.device
        graph = False
        enc, rope, images = self.encoders, None, False
        if enc is not None:  # encode the images this step covers; their rotary positions
            row0 = s.cu - s.num_sched
            images = enc.prepare(req_ids, s.computed, s.num_sched)
            rope = enc.rope_positions(req_ids, s.positions, s.num_sched, row0)
        if (self.graph_runner is not None and s.decode_only and self.has_kv_cache
                and not images and (rope is None or rope.ndim == 1)
                and self.graph_runner.can_run(len(req_ids))
                and not any(batch.requests[r].sampling_params.prompt_logprobs is not None
                            for r in req_ids if batch.requests[r].sampling_params is not None)):
            width = int(batch.num_blocks[s.rows].max())
            bt = batch.block_table[s.rows, :width]
            p = s.positions
            slots = batch.block_table[s.rows, p // self.block_size].astype(np.int64) * self.block_size \
                + p % self.block_size
            h = self.graph_runner.run(s.input_ids, p, slots, bt, s.pend_dst, s.pend_src, self.prev_tokens,
                                      rope_pos=rope)
            graph = self.graph_runner.capture_graphs
            meta = None
        else:
            meta = self._attention_metadata(s)
            ids = to_device(s.input_ids, torch.long, dev)
            if len(s.pend_dst):
                ids[to_device(s.pend_dst, torch.long, dev)] = \
                    self.prev_tokens[to_device(s.pend_src, torch.long, dev)]
            pos = to_device(s.positions if rope is None else rope, torch.long, dev)
            embeds = enc.inputs_embeds(req_ids, s.computed, s.num_sched, row0, ids) if images else None
            set_attention_metadata(meta)
            try:
                if embeds is not None:
                    h = self.model(ids, pos, embeds)
                elif self.cpu_decoder is not None and meta.max_query_len == 1:
                    h = self.cpu_decoder(ids, pos, meta)
                elif (getattr(self.model, "is_encoder_only", False)
                      and any(batch.requests[r].token_type_ids for r in req_ids)):
                    h = self.model(ids, pos, self._token_types(s))
                else:
                    h = self.model(ids, pos)
            finally:
                set_attention_metadata(None)
        return self._sample_and_pool(s, h, failed, graph)

    def _token_types(self, s: _StepInputs) -> torch.Tensor:
        types = np.zeros(len(s.input_ids), dtype=np.int64)
        starts = s.cu - s.num_sched
        for i, rid in enumerate(s.req_ids):
            t = self.batch.requests[rid].token_type_ids
            if t:
                c = int(s.computed[i])
                types[starts[i]:s.cu[i]] = t[c:c + int(s.num_sched[i])]
        return to_device(types, torch.long, self.device)

    def _sample_and_pool(self, s: _StepInputs, h: torch.Tensor, failed: dict[str, str],
                         graph: bool) -> PendingStep:
        batch = self.batch
        dev = self.device
        out = ModelRunnerOutput(failed=failed, graph=graph)
        logit_rows: list[int] = []
        sample_ids: list[str] = []
        plp: list[tuple[str, int, int, int]] = []   # req, first logit row, rows, first position
        pool_ids: list[str] = []
        pool_starts: list[int] = []
        pool_lens: list[int] = []
        ends = s.computed + s.num_sched
        for i, rid in enumerate(s.req_ids):
            st = batch.requests[rid]
            row0 = int(s.cu[i] - s.num_sched[i])
            n = int(s.num_sched[i])
            start, end = int(s.computed[i]), int(ends[i])
            n_prompt = len(st.prompt_token_ids)
            if st.pooling_params is not None:
                if end >= n_prompt:
                    pool_ids.append(rid)
                    pool_starts.append(row0)
                    pool_lens.append(n)
                continue
            p = st.sampling_params
            done = st.num_prompt_logprobs  # a preempted request recomputes rows it already sent
            if p.prompt_logprobs is not None and max(start, done) < n_prompt - 1:
                first = max(start, done)
                m = min(end, n_prompt - 1) - first  # rows whose next token is still a prompt token
                if m > 0:
                    plp.append((rid, len(logit_rows), m, first))
                    logit_rows.extend(range(row0 + first - start, row0 + first - start + m))
                    st.num_prompt_logprobs = first + m
            if end >= st.num_tokens:  # prompt fully computed: sample the next token
                sample_ids.append(rid)
                logit_rows.append(row0 + n - 1)
        if pool_ids:
            self._pool(h, pool_ids, pool_starts, pool_lens, out)
        if not logit_rows:
            return self._finish(out, [], None)
        logits = self.model.compute_logits(h[to_device(logit_rows, torch.long, dev)])
        lps = _HostLogprobs()
        if plp:
            lps.prompt, lps.prompt_parts = self._prompt_logprobs(logits, plp)
        if not sample_ids:
            return self._finish(out, [], None, lps)
        sl = logits
        if plp:  # sampling rows are the ones not claimed by prompt logprobs
            taken = {r0 + j for _, r0, m, _ in plp for j in range(m)}
            sl = logits[to_device([i for i in range(len(logit_rows)) if i not in taken], torch.long, dev)]
        sl = apply_token_bitmask(sl, self.grammar, sample_ids)  # structured outputs' rows only
        res = self.sampler(sl, self._sampling_metadata(sample_ids))
        out.req_ids = sample_ids
        if res.logprobs is not None:
            lps.sampled, lps.sampled_rows, lps.sampled_keep = res.logprobs, res.logprobs_rows, res.logprobs_keep
        return self._finish(out, sample_ids, res.token_ids, lps)

    def _prompt_logprobs(self, logits: torch.Tensor, plp: list[tuple[str, int, int, int]]
                         ) -> tuple[LogprobsTensors, list[tuple[str, int, int]]]:
        """Logprob rows of the prompt positions in plp ((req, first logit row, rows, first
        position)), all requests at once, left on the device."""
        reqs = self.batch.requests
        rows = np.concatenate([np.arange(r0, r0 + m) for _, r0, m, _ in plp])
        nxt = np.concatenate([np.asarray(reqs[rid].prompt_token_ids[p0 + 1:p0 + 1 + m], dtype=np.int64)
                              for rid, _, m, p0 in plp])
        parts = [(rid, m, reqs[rid].sampling_params.prompt_logprobs) for rid, _, m, _ in plp]
        dev = self.device
        sel = logits if len(rows) == logits.shape[0] else logits.index_select(0, to_device(rows, torch.long, dev))
        with sample_ops.one_thread_on_cpu(sel):
            lps = sample_ops.logprobs_topk(sel, to_device(nxt, torch.long, dev), max(k for _, _, k in parts))
        return lps, parts

    def _pool(self, h: torch.Tensor, ids: list[str], starts: list[int], lens: list[int],
              out: ModelRunnerOutput) -> None:
        """Each request's result from its own rows of this step (decoders: only the last prompt
        token's row matters, which this step computed; the pooler reads no other)."""
        params = [self.batch.requests[rid].pooling_params for rid in ids]
        for rid, v in zip(ids, self.pooler(h, starts, lens, params)):
            out.pooler_output[rid] = v

    def _sampling_metadata(self, req_ids: list[str]) -> SamplingMetadata:
        batch = self.batch
        rows = np.fromiter((batch.row_of[r] for r in req_ids), dtype=np.int64, count=len(req_ids))
        positions = batch.num_tokens[rows] - batch.num_prompt_tokens[rows]  # outputs so far
        params = [batch.requests[r].sampling_params for r in req_ids]

        def tail(i: int, m: int) -> tuple[list[int], int]:  # rows with multi-token bad words
            row = rows[i]
            end, start = int(batch.num_tokens[row]), int(batch.num_prompt_tokens[row])
            return batch.token_ids[row, max(start, end - m):end].tolist(), self._prev_rows.get(req_ids[i], -1)
        return batch.sampling.metadata(params, rows, positions, tail, self.prev_tokens)

    def _finish(self, out: ModelRunnerOutput, sample_ids: list[str],
                tokens: Optional[torch.Tensor], lps: Optional[_HostLogprobs] = None) -> PendingStep:
        """Start the sampled ids' (and logprobs') copy to the host; remember the ids for the
        next step's inputs."""
        self._launches += 1
        timings = self.encoders.take_timings() if self.encoders is not None else None
        if lps is not None:
            if lps.prompt is None and lps.sampled is None:
                lps = None
            else:
                lps.prompt = lps.prompt.to_host() if lps.prompt is not None else None
                lps.sampled = lps.sampled.to_host() if lps.sampled is not None else None
        if not sample_ids:
            if lps is not None and self.on_cuda:
                event = torch.cuda.Event()
                event.record()
                return PendingStep(self, out, None, event, [], lps, timings)
            return PendingStep(self, out, None, None, [], lps, timings)
        batch = self.batch
        placeholders = [(rid, batch.append_token(rid, PLACEHOLDER)) for rid in sample_ids]
        self._prev_rows = {rid: k for k, rid in enumerate(sample_ids)}
        self.prev_tokens = tokens
        if not self.on_cuda:
            return PendingStep(self, out, tokens, None, placeholders, lps, timings)
        n = len(sample_ids)
        k = self._launches & 1
        if len(self._out_bufs) < 2 or self._out_bufs[k].numel() < n:
            size = max(n, 256)
            self._out_bufs = [torch.empty(size, dtype=torch.long).pin_memory() for _ in range(2)]
        host = self._out_bufs[k][:n]
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingStep(self, out, host, event, placeholders, lps, timings)

    def forget(self, req_ids) -> None:
        """Drop requests the engine never knew about (the start-up warm-up's)."""
        for rid in req_ids:
            self.batch.remove(rid)
            self._prev_rows.pop(rid, None)
            if self.encoders is not None:
                self.encoders.remove_request(rid)
        self.prev_tokens = None

    def execute(self, sched) -> ModelRunnerOutput:
        """One step, waiting for its sampled ids (the non-overlapped path)."""
        return self.launch(sched).result()
