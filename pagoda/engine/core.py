"""The engine core: schedule -> execute -> update, one step at a time.

`EngineCore` is the loop body, used in-process by the offline `LLM` and inside
`EngineCoreProc`, which runs it in its own process for `pagoda serve` (or in a thread, where a
second process does not pay off): requests arrive over ZMQ and one `EngineCoreOutputs` message
per step goes back to each API server process that has requests in it.

With `overlap` (on CUDA) a step's sampled ids are read back one call later: the host schedules
and launches step N+1 while the GPU still runs step N, and step N+1 takes the ids it needs from
step N's device tensor. A request that finishes at step N drops the token step N+1 computed for
it, so outputs equal the step-by-step path's, for every sampling setting (the sampler keeps its
per-request state on the device; logprobs come back with the ids). A step with a request that is
not `overlappable` runs step by step.

Structured outputs stay overlapped: a constrained request's bitmask for step N+1 depends on the
token of step N, so the engine hands the runner a bitmask that is filled on demand — the runner
queues step N+1's forward pass, then asks for it; filling resolves step N (the matchers advance
with its tokens) and computes the rows while the device runs the forward pass.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from typing import Optional

from pagoda.config import EngineArgs
from pagoda.engine.kv_cache_manager import KVCacheManager
from pagoda.engine.messages import (EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest,
                                    EngineReady, FinishReason)
from pagoda.engine.request import Request
from pagoda.engine.scheduler import Scheduler
from pagoda.engine.scheduler_output import GrammarBitmask, SchedulerOutput
from pagoda.structured_output.manager import StructuredOutputManager

logger = logging.getLogger("pagoda.engine")


class EngineCore:
    def __init__(self, args: EngineArgs):
        t0 = time.time()
        self.args = args
        if args.tensor_parallel_size > 1:
            from pagoda.executor.multiproc import MultiprocExecutor
            self.model_executor = MultiprocExecutor(args)
        else:
            from pagoda.executor.uniproc import UniProcExecutor
            self.model_executor = UniProcExecutor(args)
        worker = self.model_executor.driver_worker
        self.model_config = worker.model_config
        num_blocks = self.model_executor.determine_num_blocks()
        self.model_executor.initialize_cache(num_blocks)
        if worker.device.type == "cuda":  # compile every kernel variant before the first request
            self.model_executor.warm_up()
        self.kv_cache_manager = KVCacheManager(num_blocks, args.block_size, args.enable_prefix_caching)
        # structured outputs: grammars compile in its thread pool, their matchers live here
        self.structured_output = StructuredOutputManager(
            self.model_config.vocab_size, self._load_tokenizer, args.structured_outputs_config,
            pin_memory=worker.device.type == "cuda",
            compile_timeout_s=args.structured_outputs_compile_timeout)
        encoder_cache = None
        if self.model_config.is_multimodal:
            from pagoda.engine.encoder_cache import EncoderCacheManager
            encoder_cache = EncoderCacheManager(worker.encoder_cache_size, args.vision_max_batch_size)
        self.scheduler = Scheduler(self.kv_cache_manager, worker.max_num_seqs,
                                   worker.max_num_batched_tokens, self.model_config.max_model_len,
                                   self.structured_output, encoder_cache)
        if args.backend:
            logger.warning("--backend %s: LMDeploy's engine choice; pagoda has one engine, so it is "
                           "ignored", args.backend)
        self._encoder_seconds: list[float] = []  # vision-encoder runs resolved since the last step
        # read sampled ids back one step late so host work overlaps the GPU; on the CPU the model
        # runs on the host anyway, so there is nothing to overlap
        self.overlap = worker.device.type == "cuda"
        self._inflight: Optional[tuple[SchedulerOutput, object]] = None
        # step kind -> [steps, seconds]; "decode-graph" steps replay a CUDA graph, "eager" don't
        self.step_timing: dict[str, list] = {}
        self.startup_s = time.time() - t0
        worker.startup.mark("other")
        logger.info("%s", worker.startup.line("engine core startup"))
        logger.info("engine core ready: %s, max_model_len %d, max_num_seqs %d, "
                    "max_num_batched_tokens %d", worker.describe(), self.model_config.max_model_len,
                    worker.max_num_seqs, worker.max_num_batched_tokens)

    @property
    def worker(self):
        return self.model_executor.driver_worker

    def _load_tokenizer(self):
        """The tokenizer grammars are compiled against (loaded by the first compilation)."""
        from pagoda.worker import loader
        return loader.load_tokenizer(self.worker.source, self.args.trust_remote_code)

    def ready_message(self) -> EngineReady:
        w = self.worker
        return EngineReady(self.kv_cache_manager.num_blocks, self.args.block_size, w.max_num_seqs,
                           w.max_num_batched_tokens, self.model_config.max_model_len, str(w.device),
                           self.model_config.dtype, w.quantization, self.startup_s,
                           getattr(w, "embedding_size", 0))

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, request: EngineCoreRequest) -> None:
        self.scheduler.add_request(Request.from_engine_core_request(request))
        p = request.sampling_params
        if p is not None and p.structured_outputs is not None:  # compiles in the background
            self.structured_output.add_request(request.request_id, p.structured_outputs,
                                               p.eos_token_ids)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, FinishReason.ABORT)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    # -- the step -------------------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        """Schedule and launch one step, then resolve the step launched before it."""
        t0 = time.time()
        so = self.structured_output
        outputs: list[EngineCoreOutput] = self._grammar_failures() if so.has_requests else []
        sched = self.scheduler.schedule()
        prev, self._inflight = self._inflight, None
        if not sched and prev is None:
            if not outputs and so.has_requests:
                so.wait_for_any(0.01)  # only requests whose grammar compiles: do not spin
            return EngineCoreOutputs(outputs, t0, self._stats(0, 0, 0.0, ""))
        reqs = self.scheduler.requests

        def resolve_prev() -> None:
            nonlocal prev
            if prev is not None:
                p, prev = prev, None
                outputs.extend(self._resolve(p))

        sync = not self.overlap or not all(reqs[r].overlappable for r in sched.num_scheduled_tokens)
        if prev is not None and (sync or not sched):  # this step must see real tokens
            resolve_prev()
            self._drop_finished(sched)
            if not sched and sched.finished_req_ids:  # nothing left to run: the next step tells
                self.scheduler.unsend_finished(sched.finished_req_ids)
                sched.finished_req_ids = set()
        if sched and so.has_requests:
            self._attach_grammar(sched, resolve_prev)
        launched = None
        n_prompt = 0
        if sched:
            for rid, n in sched.num_scheduled_tokens.items():
                r = reqs[rid]
                if r.num_computed_tokens < r.num_prompt_tokens:
                    n_prompt += min(n, r.num_prompt_tokens - r.num_computed_tokens)
            try:
                pending = self.model_executor.execute_model(sched)
            except Exception as e:  # the runner isolates request failures; this is its own
                logger.exception("engine step failed; failing its %d requests",
                                 len(sched.num_scheduled_tokens))
                outputs += self._fail(list(sched.num_scheduled_tokens), f"{type(e).__name__}: {e}")
                pending = None
            if pending is not None:
                self.scheduler.on_launched(sched)
                launched = (sched, pending)
        resolve_prev()
        graph = False
        if launched is not None:
            graph = bool(getattr(launched[1].output, "graph", False))
            if sync:
                outputs += self._resolve(launched)
            else:
                self._inflight = launched
        n_gen = sum(len(o.new_token_ids) for o in outputs)
        kind = ("decode-graph" if graph else "eager") if launched is not None else ""
        dt = time.time() - t0
        if kind:
            rec = self.step_timing.setdefault(kind, [0, 0.0])
            rec[0] += 1
            rec[1] += dt
        stats = self._stats(n_prompt, n_gen, dt, kind)
        if self._encoder_seconds:
            stats.step_encoder_seconds, self._encoder_seconds = self._encoder_seconds, []
        return EngineCoreOutputs(outputs, time.time(), stats)

    def _attach_grammar(self, sched: SchedulerOutput, resolve_prev) -> None:
        """Structured outputs: the bitmask of the step's constrained rows, filled when the runner
        asks for it (after queueing the forward pass): first the previous step is resolved, so
        every matcher has accepted its latest token, then the rows are filled."""
        so = self.structured_output
        ids = so.sampling_requests(sched.num_scheduled_tokens, self.scheduler.requests)
        if not ids:
            return
        grammar = sched.grammar = GrammarBitmask(ids)

        def fill() -> None:
            resolve_prev()
            grammar.bitmask, grammar.req_ids = so.fill(ids)
            grammar.vocab_size = so.grammar_vocab_size
        grammar.fill = fill

    def _grammar_failures(self) -> list[EngineCoreOutput]:
        """Requests whose grammar did not compile end with an error (the front end validated
        them, so this is rare: a grammar xgrammar parses but cannot compile)."""
        failed = self.structured_output.take_failures()
        if not failed:
            return []
        why = {rid: (err, invalid) for rid, err, invalid in failed}
        return [EngineCoreOutput(r.request_id, finish_reason=FinishReason.ERROR, error=why[r.request_id][0],
                                 invalid_request=why[r.request_id][1])
                for r in self.scheduler.finish_requests(list(why), FinishReason.ERROR)]

    def _drop_finished(self, sched: SchedulerOutput) -> None:
        """Requests that the step just resolved finished are taken out of the next step."""
        reqs = self.scheduler.requests
        gone = [r for r in sched.num_scheduled_tokens if r not in reqs]
        if not gone:
            return
        for rid in gone:
            sched.total_num_scheduled_tokens -= sched.num_scheduled_tokens.pop(rid)
        c = sched.scheduled_cached_reqs
        keep = [i for i, r in enumerate(c.req_ids) if r in reqs]
        c.req_ids = [c.req_ids[i] for i in keep]
        c.resumed_from_preemption = [c.resumed_from_preemption[i] for i in keep]
        c.new_block_ids = [c.new_block_ids[i] for i in keep]
        c.num_computed_tokens = [c.num_computed_tokens[i] for i in keep]
        sched.scheduled_new_reqs = [n for n in sched.scheduled_new_reqs if n.req_id in reqs]
        # the worker learns they ended with the next step's finished_req_ids

    def _resolve(self, launched) -> list[EngineCoreOutput]:
        sched, pending = launched
        try:
            result = pending.result()
        except Exception as e:
            logger.exception("reading back a step failed; failing its requests")
            return self._fail(list(sched.num_scheduled_tokens), f"{type(e).__name__}: {e}")
        self._encoder_seconds += result.encoder_seconds
        return self.scheduler.update_from_output(sched, result)

    def _fail(self, request_ids: list[str], why: str) -> list[EngineCoreOutput]:
        self.kv_cache_manager.reset_prefix_cache()
        outs = []
        for req in self.scheduler.finish_requests(request_ids, FinishReason.ERROR):
            outs.append(EngineCoreOutput(req.request_id, finish_reason=FinishReason.ERROR, error=why))
        return outs

    def _stats(self, n_prompt: int, n_gen: int, dt: float, kind: str):
        s = self.scheduler.stats()
        s.step_prompt_tokens, s.step_generation_tokens, s.step_time_s, s.step_kind = n_prompt, n_gen, dt, kind
        return s

    def shutdown(self) -> None:
        self.structured_output.shutdown()
        if self._inflight is not None:
            try:
                self._inflight[1].result()
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
            self._inflight = None
        self.model_executor.shutdown()


# -------------------------------------------------------------------------------------------------
# The engine core behind ZMQ sockets: in its own process (`pagoda serve`) or a thread.

class EngineCoreProc:
    """Runs EngineCore with a socket in (requests from every API server) and one socket out per
    API server. A thread reads and decodes the input socket so the step loop never blocks on it."""

    def __init__(self, args: EngineArgs, input_address: str, output_addresses: list[str]):
        import zmq
        from pagoda.engine.messages import Encoder, UtilityCall, decoder
        self.core = EngineCore(args)
        self.ctx = zmq.Context()
        self.encoder = Encoder()
        self.output_socks = []
        for addr in output_addresses:
            s = self.ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 2000)
            s.connect(addr)
            self.output_socks.append(s)
        self.input_address = input_address
        self.inbox: "queue.Queue" = queue.Queue()
        self._decode_request = decoder(EngineCoreRequest)
        self._decode_abort = decoder(list[str])
        self._decode_utility = decoder(UtilityCall)
        self._stop = False
        self._reader = threading.Thread(target=self._read_input, name="pagoda-engine-input", daemon=True)
        self._reader.start()

    def _read_input(self) -> None:
        import zmq
        from pagoda.engine.messages import RequestType
        sock = self.ctx.socket(zmq.PULL)
        sock.bind(self.input_address)
        while True:
            kind, payload = sock.recv_multipart(copy=False)
            t = RequestType(int.from_bytes(kind.bytes, "little"))
            if t == RequestType.ADD:
                self.inbox.put((t, self._decode_request.decode(payload.buffer)))
            elif t == RequestType.ABORT:
                self.inbox.put((t, self._decode_abort.decode(payload.buffer)))
            elif t == RequestType.UTILITY:
                self.inbox.put((t, self._decode_utility.decode(payload.buffer)))
            elif t == RequestType.SHUTDOWN:
                self.inbox.put((t, None))
                return

    def _handle(self, kind, payload) -> None:
        from pagoda.engine.messages import RequestType, UtilityOutput
        if kind == RequestType.ADD:
            try:
                self.core.add_request(payload)
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                self._send({payload.client_index: [EngineCoreOutput(
                    payload.request_id, finish_reason=FinishReason.ERROR, error=str(e))]})
        elif kind == RequestType.ABORT:
            self.core.abort_requests(payload)
        elif kind == RequestType.UTILITY:
            try:
                result, failure = getattr(self, f"utility_{payload.method}")(*payload.args), None
            except Exception as e:  # noqa: BLE001 - reported to the caller
                result, failure = None, f"{type(e).__name__}: {e}"
            out = EngineCoreOutputs(timestamp=time.time(), scheduler_stats=self.core._stats(0, 0, 0.0, ""),
                                    utility_output=UtilityOutput(payload.call_id, result, failure))
            for s in self.output_socks:
                s.send(self.encoder(out), copy=False)
        elif kind == RequestType.SHUTDOWN:
            self._stop = True

    def utility_reset_prefix_cache(self) -> bool:
        self.core.kv_cache_manager.reset_prefix_cache()
        return True

    def utility_step_timing(self) -> dict:
        return self.core.step_timing

    def _send(self, by_client: dict[int, list[EngineCoreOutput]], outputs: Optional[EngineCoreOutputs] = None) -> None:
        for idx, sock in enumerate(self.output_socks):
            outs = by_client.get(idx)
            if outs is None and outputs is None:
                continue
            msg = EngineCoreOutputs(outs or [], outputs.timestamp if outputs else time.time(),
                                    outputs.scheduler_stats if outputs else None)
            sock.send(self.encoder(msg), copy=False)

    def _send_idle_stats(self) -> None:
        stats = self.core._stats(0, 0, 0.0, "")
        key = (stats.num_running, stats.num_waiting, stats.kv_cache_usage)
        if key != getattr(self, "_idle_key", None):
            self._idle_key = key
            self._send({}, EngineCoreOutputs([], time.time(), stats))

    def run_busy_loop(self) -> None:
        """Drain the inbox, step while there is work, block on the inbox when idle."""
        core = self.core
        reqs = core.scheduler.requests
        while not self._stop:
            block = not core.has_work()
            try:
                while True:
                    kind, payload = self.inbox.get(block=block, timeout=None if block else 0)
                    self._handle(kind, payload)
                    block = False
            except queue.Empty:
                pass
            if self._stop:
                break
            if not core.has_work():
                self._send_idle_stats()  # aborts may have emptied the batch: say so
                continue
            client_of = {rid: r.client_index for rid, r in reqs.items()}
            out = core.step()
            self._idle_key = None
            by_client: dict[int, list[EngineCoreOutput]] = {}
            for o in out.outputs:
                by_client.setdefault(client_of.get(o.request_id, 0), []).append(o)
            self._send(by_client, out)
        core.shutdown()

    def close(self) -> None:
        for s in self.output_socks:
            s.close()
        self.ctx.term()


def run_engine_core(args: EngineArgs, input_address: str, output_addresses: list[str],
                    ready_address: str, log_level: str = "INFO") -> None:
    """Entry point of the engine-core process (and thread): build, report ready (or the error
    that stopped the start), then serve steps until told to shut down."""
    import zmq
    from pagoda.engine.messages import Encoder
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # the API server drains, not us
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        from pagoda.log import configure_logging
        configure_logging(log_level)
    ctx = zmq.Context.instance()
    ready = ctx.socket(zmq.PUSH)
    ready.setsockopt(zmq.LINGER, 5000)
    ready.connect(ready_address)
    enc = Encoder()
    try:
        proc = EngineCoreProc(args, input_address, output_addresses)
    except BaseException as e:  # noqa: BLE001 - reported to the API server, which exits
        logger.exception("engine core failed to start")
        ready.send_multipart([b"error", f"{e}".encode()])
        ready.close()
        return
    ready.send_multipart([b"ready", enc(proc.core.ready_message())])
    ready.close()
    if threading.current_thread() is threading.main_thread():  # a process of its own
        from pagoda.startup import freeze_after_start
        freeze_after_start()
    try:
        proc.run_busy_loop()
    finally:
        proc.close()

