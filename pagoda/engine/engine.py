"""LLMEngine: add_request / abort_request / step.

Owns the tokenizer, the scheduler (with its block manager) and the model runner. `step()` runs one
scheduled batch and returns a RequestOutput for every request that progressed.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from pagoda.config import EngineArgs
from pagoda.engine.block_manager import BlockManager
from pagoda.engine.detokenizer import IncrementalDetokenizer, decode_token
from pagoda.engine.request import PENDING, Request, Sequence, SequenceStatus
from pagoda.engine.scheduler import Scheduler, SchedulerOutput
from pagoda.outputs import CompletionOutput, Logprob, RequestOutput
from pagoda.sampling_params import SamplingParams

logger = logging.getLogger("pagoda.engine")

PromptType = Union[str, list[int], dict]


@dataclass
class ModelConfig:
    model: str
    served_model_names: list[str]
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    dtype: str
    device: str
    hf_config: object = None
    generation_config: dict = field(default_factory=dict)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_gpu_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int


@dataclass
class StepStats:
    num_prompt_tokens: int
    num_generation_tokens: int
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    step_time_s: float


@dataclass
class _Launched:
    """A step queued on the device whose sampled ids the engine has not read back yet."""
    pending: object         # model_runner.PendingStep
    seqs: list[Sequence]    # every sequence the step computed tokens for
    indices: list[int]      # where each sampling sequence's PENDING token sits in its token_ids
    graph: bool             # replayed a CUDA graph


def _pick_device(arg: str) -> torch.device:
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device: {arg!r} asked for, but no CUDA device is visible")
    return torch.device(arg)


def _pick_dtype(arg: str, device: torch.device) -> torch.dtype:
    if arg == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[arg]


class LLMEngine:
    def __init__(self, args: EngineArgs):
        from pagoda.worker import loader
        from pagoda.worker.model_runner import ModelRunner
        from pagoda.models.registry import resolve_model_class

        t0 = time.time()
        self.args = args
        self.device = _pick_device(args.device)
        self.dtype = _pick_dtype(args.dtype, self.device)
        if self.device.type == "cpu":
            from pagoda.worker.cpu_threads import set_threads
            set_threads(args.threads)
        src = loader.resolve_model(args.model, args.tokenizer, args.revision, args.download_dir)
        self.source = src
        hf_config = loader.load_config(src, args.trust_remote_code)
        if getattr(hf_config, "text_config", None) is not None and not hasattr(hf_config, "num_hidden_layers"):
            hf_config = hf_config.text_config
        model_cls = resolve_model_class(hf_config)
        self.tokenizer = None if args.skip_tokenizer_init else loader.load_tokenizer(src, args.trust_remote_code)
        # the engine thread detokenizes with its own copy: HF fast tokenizers are not safe to use
        # from two threads at once ("Already borrowed"), and the server tokenizes on its own thread
        self._detok_tokenizer = copy.deepcopy(self.tokenizer) if self.tokenizer is not None else None

        max_pos = int(getattr(hf_config, "max_position_embeddings", 0) or 0) or 2048
        max_model_len = args.max_model_len or max_pos
        if args.max_model_len and args.max_model_len > max_pos:
            raise ValueError(f"--max-model-len: {args.max_model_len} exceeds the model's "
                             f"max_position_embeddings ({max_pos})")
        eos = set()
        gen_eos = src.generation_config.get("eos_token_id")
        for e in (gen_eos, getattr(hf_config, "eos_token_id", None),
                  self.tokenizer.eos_token_id if self.tokenizer is not None else None):
            if isinstance(e, int):
                eos.add(e)
            elif isinstance(e, (list, tuple)):
                eos.update(int(x) for x in e)
        served = args.served_model_name or [src.name]
        self.model_config = ModelConfig(src.name, served, max_model_len, hf_config.vocab_size,
                                        tuple(sorted(eos)), str(self.dtype).removeprefix("torch."),
                                        str(self.device), hf_config, src.generation_config)

        # -- model ------------------------------------------------------------------------------
        prev = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = model_cls(hf_config, max_position=max_model_len)
        finally:
            torch.set_default_dtype(prev)
        self._load_weights(model, src, hf_config)
        self.quantization = self._pick_quantization(src)
        from pagoda.layers.quantization import quantize_model
        quantize_model(model, self.quantization)
        model.eval()
        self.model = model

        # -- scheduler limits ---------------------------------------------------------------------
        on_cuda = self.device.type == "cuda"
        default_seqs = 64
        if on_cuda:  # big cards batch more, as vLLM does on 70+ GiB (CUDA graphs stop at 512)
            mem = torch.cuda.get_device_properties(self.device).total_memory
            default_seqs = 512 if mem >= 70 * 2**30 else 256
        self.max_num_seqs = args.max_num_seqs or default_seqs
        self.max_num_batched_tokens = args.max_num_batched_tokens or (8192 if on_cuda else 2048)

        self.runner = ModelRunner(model, hf_config, self.device, self.dtype, args.block_size, args.seed)
        backend = args.attention_backend
        if backend == "auto":
            backend = "triton" if on_cuda else "torch"
        if backend == "triton" and not on_cuda:
            raise ValueError("--attention-backend: triton needs a CUDA device; use torch on CPU")
        from pagoda.kernels import ops
        ops.use_triton(backend == "triton")
        self.attention_backend = backend
        num_blocks = self._plan_kv_cache(max_model_len)
        self.runner.allocate_kv_cache(num_blocks)
        if on_cuda and not args.enforce_eager and backend == "triton":  # torch backend syncs
            self.runner.capture_cuda_graphs(self.max_num_seqs, max_model_len)
        self.block_manager = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.max_num_seqs, self.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        # requests the engine could not run (their step failed again when run alone): the error
        # each one gets, collected by the caller after step()
        self.failed: dict[str, Exception] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.step_listeners: list[Callable[[StepStats], None]] = []
        # False: step() reports only finished requests (offline batches skip per-step outputs)
        self.stream_outputs = True
        # step kind -> [steps, seconds]; "decode-graph" steps replay a CUDA graph, "eager" don't
        self.step_timing: dict[str, list] = {}
        self.last_step_stats: Optional[StepStats] = None
        # read sampled ids back one step late so host work overlaps the GPU (see step()); on the
        # CPU the model runs on the host anyway, so there is nothing to overlap
        self.overlap = on_cuda
        self._inflight = None  # the launched step not yet resolved (model_runner.PendingStep)
        logger.info("engine ready in %.1fs: %s on %s (%s), %d KV blocks x %d tokens = %d tokens, "
                    "max_model_len %d, max_num_seqs %d, max_num_batched_tokens %d", time.time() - t0,
                    src.name, self.device, self.model_config.dtype, num_blocks, args.block_size,
                    num_blocks * args.block_size, max_model_len, self.max_num_seqs,
                    self.max_num_batched_tokens)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args)

    # -- loading --------------------------------------------------------------------------------
    def _load_weights(self, model, src, hf_config) -> None:
        from tqdm import tqdm
        from pagoda.worker import loader
        if self.args.load_format == "dummy":
            g = torch.Generator(device=self.device).manual_seed(self.args.seed)
            for p in model.parameters():
                p.data.normal_(0, 0.02, generator=g)
            return
        if src.gguf_file:
            total = loader.gguf_tensor_count(src.gguf_file)
            weights = loader.iter_gguf(src.gguf_file, hf_config)
        else:
            total = loader.count_safetensors(src.weights_dir)
            weights = loader.iter_safetensors(src.weights_dir)
        bar = tqdm(weights, total=total, desc="Loading weights", unit="tensor", leave=False,
                   disable=None)
        loaded = model.load_weights(bar)
        missing = model.expected_weights() - loaded
        if missing:
            raise ValueError(f"--model: checkpoint is missing {len(missing)} weight(s), e.g. "
                             f"{sorted(missing)[:3]}")

    def _pick_quantization(self, src) -> str:
        """vLLM runs a GGUF's quantized weights as they are; on the CPU our nearest fast path is
        int8 groups of 32, which hold Q4_0/Q4_1/Q8_0 blocks exactly (tests/test_cpu_kernels.py;
        tests/test_fidelity.py runs the bundled GGUF this way against transformers)."""
        q = self.args.quantization
        if q is None:
            q = "none"
            if src.gguf_file and self.device.type == "cpu" and self.args.load_format != "dummy":
                from pagoda.worker import loader
                types = loader.gguf_quant_types(src.gguf_file)
                if types:
                    q = "int8"
                    logger.info("GGUF weights are %s: running int8 on the CPU "
                                "(--quantization none for %s)", ",".join(sorted(types)), self.dtype)
        return q

    def _plan_kv_cache(self, max_model_len: int) -> int:
        from pagoda.worker import kv_cache as kvc
        args = self.args
        block_bytes = self.runner.block_bytes()
        on_cuda = self.device.type == "cuda"
        if args.num_gpu_blocks_override:
            n = args.num_gpu_blocks_override
        elif args.kv_cache_memory:
            n = args.kv_cache_memory // block_bytes
        elif on_cuda:
            peak = self.runner.profile_peak_memory(self.max_num_batched_tokens, max_model_len,
                                                   self.max_num_seqs)
            free, total = torch.cuda.mem_get_info(self.device)
            non_torch = total - free - torch.cuda.memory_reserved(self.device)
            budget = int(total * args.gpu_memory_utilization) - peak - max(non_torch, 0)
            n = max(budget // block_bytes, 0)
            weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
            logger.info("memory plan: total %.1f GiB x %.2f; weights %.2f GiB; peak activations "
                        "%.2f GiB; non-torch %.2f GiB; KV cache %.2f GiB = %d blocks (%d tokens)",
                        total / 2**30, args.gpu_memory_utilization, weights / 2**30,
                        (peak - weights) / 2**30, non_torch / 2**30, n * block_bytes / 2**30, n,
                        n * args.block_size)
        else:
            n = kvc.CPU_DEFAULT_KV_BYTES // block_bytes
        kvc.check_fits(n, args.block_size, max_model_len, on_cuda)
        return n

    # -- requests -------------------------------------------------------------------------------
    def _tokenize(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text prompts need a tokenizer (started with "
                                 "--skip-tokenizer-init); send token ids")
            return prompt, self.tokenizer(prompt).input_ids
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError("prompt: must be a string or a list of token ids")

    def prepare_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                        arrival_time: Optional[float] = None) -> Request:
        """Tokenize and validate (ValueError naming the field on bad input). Touches no engine
        state, so the async front end calls it on its own thread before queueing the request."""
        text, ids = self._tokenize(prompt)
        mc = self.model_config
        if not ids:
            raise ValueError("prompt: must not be empty")
        bad = [t for t in ids if not 0 <= t < mc.vocab_size]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} is outside the vocabulary (0..{mc.vocab_size - 1})")
        if len(ids) >= mc.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens, but max_model_len is {mc.max_model_len} "
                             f"(the prompt must leave room for at least one output token)")
        if params.max_tokens is not None and len(ids) + params.max_tokens > mc.max_model_len:
            raise ValueError(f"max_tokens: {params.max_tokens} output tokens + {len(ids)} prompt tokens "
                             f"exceed max_model_len {mc.max_model_len}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(params, name)
            if v is not None and v > self.args.max_logprobs:
                raise ValueError(f"{name}: {v} requested, but at most --max-logprobs "
                                 f"{self.args.max_logprobs} are allowed")
        params = params.clone(eos_token_ids=mc.eos_token_ids,
                              max_tokens=params.max_tokens or mc.max_model_len - len(ids))
        return Request(request_id, text, ids, params, arrival_time)

    def add_prepared(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        p = req.params
        for seq in req.seqs:
            if self._detok_tokenizer is not None:
                seq.detok = IncrementalDetokenizer(self._detok_tokenizer, req.prompt_token_ids,
                                                   p.skip_special_tokens, p.stop,
                                                   p.include_stop_str_in_output)
            self.scheduler.add(seq)
        self.requests[req.request_id] = req
        self.prompt_tokens_total += len(req.prompt_token_ids)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: Optional[float] = None) -> Request:
        req = self.prepare_request(request_id, prompt, params, arrival_time)
        self.add_prepared(req)
        return req

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.drop_pending()  # tokens still in flight are dropped with the request
                seq.finish_reason = "abort"
        req.metrics.finished_time = time.time()
        return self._make_output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step, then resolve the step launched before it.

        With `overlap` (on CUDA) a step's sampled ids are read back one call later: the host
        schedules and prepares step N+1 while the GPU still runs step N, and step N+1 takes the
        ids it needs from step N's device tensor. Until resolved, such a token is a PENDING
        placeholder at the end of its sequence; a sequence that finishes at step N drops the
        token step N+1 computed for it, so outputs equal the step-by-step path's. Batches whose
        sampling reads the token history (penalties) or returns logprobs run step by step."""
        t0 = time.time()
        sched = self.scheduler.schedule()
        prev, self._inflight = self._inflight, None
        if not sched and prev is None:
            return []
        outputs: list[RequestOutput] = []
        n_gen = 0
        sync = not self.overlap or not all(s.overlappable and not s.needs_prompt_logprobs
                                           for s in sched.num_tokens)
        if prev is not None and (sync or not sched):  # this step must see real tokens
            outputs, n_gen = self._resolve(prev)
            prev = None
            for seq in [s for s in sched.num_tokens if s.is_finished]:
                del sched.num_tokens[seq]  # finished by what was just resolved; blocks are freed
        launched = None
        n_prompt = 0
        if sched:
            try:
                launched, n_prompt = self._launch(sched)
            except Exception:
                logger.exception("engine step failed; running its %d requests one by one",
                                 len(sched.num_tokens))
                if prev is not None:
                    outs, n = self._resolve(prev)
                    outputs += outs
                    n_gen += n
                    prev = None
                outs, n = self._run_isolated(sched)
                outputs += outs
                n_gen += n
        if prev is not None:
            outs, n = self._resolve(prev)
            outputs += outs
            n_gen += n
        if launched is not None:
            if sync:
                outs, n = self._resolve(launched)
                outputs += outs
                n_gen += n
            else:
                self._inflight = launched
        self.generation_tokens_total += n_gen
        self._record_step(n_prompt, n_gen, t0, launched is not None and launched.graph)
        return outputs

    def _run_isolated(self, sched: SchedulerOutput) -> tuple[list[RequestOutput], int]:
        """A step failed: run each of its sequences alone, step by step, so that only a request
        whose own preparation or sampling fails is failed, never its batch neighbours. Recomputing
        a sequence's tokens writes the same K/V to the same slots, so a partly run step is safe."""
        outputs: list[RequestOutput] = []
        n_gen = 0
        for seq, n in list(sched.num_tokens.items()):
            if seq.is_finished:
                continue
            try:
                launched, _ = self._launch(SchedulerOutput({seq: n}))
                outs, k = self._resolve(launched)
            except Exception as e:
                rid = seq.request.request_id
                logger.exception("request %s failed in the engine", rid)
                self.failed[rid] = e
                self.abort_request(rid)
                continue
            outputs += outs
            n_gen += k
        return outputs, n_gen

    def _launch(self, sched) -> tuple["_Launched", int]:
        now = time.time()
        n_prompt = 0
        for seq, n in sched.num_tokens.items():
            m = seq.request.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now
            if seq.num_computed_tokens < seq.prompt_len:
                n_prompt += min(n, seq.prompt_len - seq.num_computed_tokens)
        try:
            pending = self.runner.launch(sched)
        except Exception:
            # blocks hashed this step may hold garbage now: forget them before anyone reuses them
            self.block_manager.reset_prefix_cache()
            raise
        for seq, n in sched.num_tokens.items():
            seq.num_computed_tokens += n
        indices = []
        for seq in pending.seqs:  # placeholders until resolved
            indices.append(len(seq.token_ids))
            seq.token_ids.append(PENDING)
            seq.num_pending += 1
        return _Launched(pending, list(sched.num_tokens), indices, self.runner.last_step_graph), n_prompt

    def _resolve(self, launched: "_Launched") -> tuple[list[RequestOutput], int]:
        """Read back a launched step's sampled ids (waits for that step only) and do its
        bookkeeping: tokens, stop checks, finishing, outputs. Returns (outputs, new tokens)."""
        try:
            result = launched.pending.result()
        except Exception:
            self.block_manager.reset_prefix_cache()
            raise
        now = time.time()
        if result.prompt_logprobs:
            for seq, rows in result.prompt_logprobs.items():
                if not seq.is_finished:
                    self._add_prompt_logprobs(seq.request, rows)
        new_tokens = 0
        max_len = self.model_config.max_model_len
        FINISHED = SequenceStatus.FINISHED
        done: list[Request] = []
        for seq, idx, tok in zip(launched.pending.seqs, launched.indices, result.sampled):
            if seq.status is FINISHED:  # finished (or aborted) before this token: never existed
                continue
            seq.token_ids[idx] = tok
            seq.num_pending -= 1
            new_tokens += 1
            m = seq.request.metrics
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            if seq in result.logprobs:
                self._add_logprobs(seq, tok, result.logprobs[seq])
            self._check_stop(seq, tok, idx + 1 - seq.prompt_len, idx + 1, max_len)
            if seq.status is FINISHED:
                seq.drop_pending()
                self.scheduler.finish(seq)
                done.append(seq.request)
        outputs = []
        # streaming reports every request the step touched; offline runs only finished ones
        reqs = {s.request.request_id: s.request for s in launched.seqs} if self.stream_outputs \
            else {r.request_id: r for r in done}
        for rid, req in reqs.items():
            if self.requests.get(rid) is not req:
                continue  # aborted meanwhile: its abort output was the last
            if req.finished:
                req.metrics.finished_time = now
                del self.requests[rid]
                outputs.append(self._make_output(req))
            elif self.stream_outputs:
                outputs.append(self._make_output(req))
        return outputs, new_tokens

    def _record_step(self, n_prompt: int, n_gen: int, t0: float, graph: bool) -> None:
        st = StepStats(n_prompt, n_gen, len(self.scheduler.running), len(self.scheduler.waiting),
                       self.block_manager.usage(), time.time() - t0)
        rec = self.step_timing.setdefault("decode-graph" if graph else "eager", [0, 0.0])
        rec[0] += 1
        rec[1] += st.step_time_s
        self.last_step_stats = st
        for fn in self.step_listeners:
            try:
                fn(st)
            except Exception:  # a broken listener must not stop the engine
                logger.exception("step listener failed")

    def _check_stop(self, seq: Sequence, tok: int, n_out: int, num_tokens: int, max_len: int) -> None:
        """n_out / num_tokens: counts up to and including tok (tokens after it may be in flight)."""
        p = seq.params
        min_ok = n_out >= p.min_tokens
        if seq.detok is not None:
            hit = seq.detok.add_token(tok, check_stop=min_ok)
            if hit is not None:
                seq.finish_reason, seq.stop_reason = "stop", hit
                seq.status = SequenceStatus.FINISHED
                return
        if min_ok and not p.ignore_eos and tok in p.eos_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", None
        elif min_ok and tok in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", tok
        elif n_out >= p.max_tokens or num_tokens >= max_len:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            seq.status = SequenceStatus.FINISHED

    def _decoded(self, tid: int) -> Optional[str]:
        return decode_token(self._detok_tokenizer, tid) if self._detok_tokenizer is not None else None

    def _add_logprobs(self, seq: Sequence, chosen: int, row) -> None:
        lp, rank, top = row
        d = {tid: Logprob(v, r + 1, self._decoded(tid)) for r, (tid, v) in enumerate(top)}
        d[chosen] = Logprob(lp, rank, self._decoded(chosen))
        # chosen token first, then alternatives by rank (dicts keep insertion order)
        d = {chosen: d[chosen], **{k: v for k, v in d.items() if k != chosen}}
        seq.logprobs.append(d)
        seq.cumulative_logprob += lp

    def _add_prompt_logprobs(self, req: Request, rows) -> None:
        start = len(req.prompt_logprobs)  # position of the prompt token each row predicts
        for j, (lp, rank, top) in enumerate(rows):
            tid = req.prompt_token_ids[start + j]
            d = {t: Logprob(v, r + 1, self._decoded(t)) for r, (t, v) in enumerate(top)}
            d[tid] = Logprob(lp, rank, self._decoded(tid))
            req.prompt_logprobs.append({tid: d[tid], **{k: v for k, v in d.items() if k != tid}})

    def _make_output(self, req: Request) -> RequestOutput:
        outs = []
        deltas_text, deltas_tok, deltas_lp = {}, {}, {}
        for i, seq in enumerate(req.seqs):
            text = ""
            if seq.detok is not None:
                text = seq.detok.text
                stable = seq.detok.stable_len(seq.is_finished)
                deltas_text[i] = text[req.sent_text_len[i]:stable]
                req.sent_text_len[i] = max(req.sent_text_len[i], stable)
                text_out = text if seq.is_finished else text[:stable]
            else:
                text_out = ""
                deltas_text[i] = ""
            toks = seq.token_ids[seq.prompt_len:len(seq.token_ids) - seq.num_pending]  # resolved only
            deltas_tok[i] = toks[req.sent_tokens[i]:]
            req.sent_tokens[i] = len(toks)
            if seq.logprobs is not None:
                deltas_lp[i] = seq.logprobs[req.sent_logprobs[i]:]
                req.sent_logprobs[i] = len(seq.logprobs)
            outs.append(CompletionOutput(i, text_out, list(toks),
                                         seq.cumulative_logprob if seq.logprobs is not None else None,
                                         list(seq.logprobs) if seq.logprobs is not None else None,
                                         seq.finish_reason, seq.stop_reason))
        m = req.metrics
        m.num_generation_tokens = sum(s.num_output_tokens - s.num_pending for s in req.seqs)
        m.num_preemptions = sum(s.num_preemptions for s in req.seqs)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished,
                             req.prompt_logprobs, m, m.num_cached_tokens, deltas_text, deltas_tok,
                             deltas_lp)

    # -- stats ----------------------------------------------------------------------------------
    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), bm.usage(),
                           bm.num_blocks, bm.queries, bm.hits, self.scheduler.num_preemptions,
                           self.prompt_tokens_total, self.generation_tokens_total)
