"""AsyncLLM: the API server's engine. The engine core runs in its own process (or a thread)
behind ZMQ; here, in the API server's event loop, requests are validated and sent, and each
step's outputs are detokenized (OutputProcessor) and handed to the requests' consumers.

A consumer that lags behind gets the deltas of several steps merged into one output (its
`RequestCollector` keeps only the latest), so a slow client costs one merge, not a queue.
A request whose consumer goes away (client disconnect, cancelled task, closed generator) is
aborted at once in the engine core: its KV blocks are free before the next step.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Callable, Optional, Union

from pagoda.config import EngineArgs
from pagoda.engine.core_client import AsyncMPClient, EngineAddresses, EngineCoreHandle, EngineDeadError
from pagoda.engine.messages import EngineCoreOutputs, EngineReady, SchedulerStats
from pagoda.engine.output_processor import OutputProcessor, RequestFailedError
from pagoda.inputs.audio import AudioProcessor
from pagoda.inputs.preprocess import InputProcessor, PromptType
from pagoda.outputs import PoolingRequestOutput, RequestOutput
from pagoda.pooling_params import PoolingParams
from pagoda.sampling_params import SamplingParams

logger = logging.getLogger("pagoda.async_llm")

__all__ = ["AsyncLLM", "EngineDeadError", "RequestFailedError"]


class RequestCollector:
    """The latest undelivered output of one request, with the deltas of any it replaced."""

    def __init__(self):
        self.output: Union[RequestOutput, PoolingRequestOutput, BaseException, None] = None
        self.ready = asyncio.Event()

    def put(self, out) -> None:
        prev = self.output
        if isinstance(prev, RequestOutput) and isinstance(out, RequestOutput):
            for i, t in prev.delta_text.items():
                out.delta_text[i] = t + out.delta_text.get(i, "")
            for i, t in prev.delta_token_ids.items():
                out.delta_token_ids[i] = t + out.delta_token_ids.get(i, [])
            for i, t in prev.delta_logprobs.items():
                out.delta_logprobs[i] = t + out.delta_logprobs.get(i, [])
        if not isinstance(prev, BaseException):
            self.output = out
        self.ready.set()

    async def get(self):
        await self.ready.wait()
        out, self.output = self.output, None
        self.ready.clear()
        if isinstance(out, BaseException):
            raise out
        return out


class AsyncLLM:
    def __init__(self, args: EngineArgs, *, engine_core: str = "process",
                 addresses: Optional[list[EngineAddresses]] = None, client_index: int = 0,
                 ready: Optional[EngineReady] = None, log_level: str = "INFO"):
        """Starts the engine cores (one per --data-parallel-size rank; `engine_core` "process" or
        "thread"), or attaches to running ones at `addresses` (an API server of several, with
        its `client_index`)."""
        from pagoda.config import data_parallel_rank_args
        from pagoda.worker import loader
        from pagoda.worker.model_config import eos_token_ids, resolve_model_config
        self.engine_args = args
        src, mc = resolve_model_config(args)  # converts a GGUF's tokenizer once, before the core starts
        self.handles: list[EngineCoreHandle] = []
        try:
            if addresses is None:
                for rank in range(args.data_parallel_size):
                    self.handles.append(EngineCoreHandle(data_parallel_rank_args(args, rank), num_clients=1,
                                                         mode=engine_core, log_level=log_level, wait=False))
                addresses = [h.addresses for h in self.handles]
            self.tokenizer = None if args.skip_tokenizer_init else loader.load_tokenizer(
                src, args.trust_remote_code)
            mc.eos_token_ids = eos_token_ids(src, mc.hf_config, self.tokenizer)
            for h in self.handles:
                h.wait_ready()
        except BaseException:
            for h in self.handles:
                h.close()
            raise
        if self.handles:
            ready = self.handles[0].ready
        self.handle = self.handles[0] if self.handles else None
        self.ready = ready
        if ready is not None:
            mc.dtype, mc.device = ready.dtype, ready.device
        self.model_config = mc
        from pagoda.inputs.multimodal import MultiModalProcessor
        self.processor = InputProcessor(mc, self.tokenizer, args.max_logprobs,
                                        MultiModalProcessor.for_model(
                                            src, mc, self.tokenizer, args,
                                            wire_dtype=mc.dtype if engine_core == "process" else None),
                                        AudioProcessor.for_model(mc, src.config_dir, self.tokenizer))
        self.output_processor = OutputProcessor(self.tokenizer)
        self.clients = [AsyncMPClient(a, client_index) for a in addresses]
        self.client = self.clients[0]
        self._engine_of: dict[str, int] = {}       # engine request id -> which engine core has it
        self._load = [0] * len(self.clients)         # engine requests in flight, per engine core
        self._collectors: dict[str, RequestCollector] = {}
        blocks = ready.num_gpu_blocks if ready else 0
        self._stats = [SchedulerStats(num_gpu_blocks=blocks) for _ in self.clients]
        self._step_listeners: list[Callable[[SchedulerStats], None]] = []
        self._dead_listeners: list[Callable[[str], None]] = []
        self._dead: Optional[str] = None
        self._loop_tasks: list[asyncio.Task] = []
        self._utility: dict[int, asyncio.Future] = {}
        if engine_core == "thread" and self.handles and mc.device == "cpu":
            # the model was loaded and runs on the engine thread; this thread's pool only throttles it
            from pagoda.worker.threads import release_openmp_pool
            release_openmp_pool()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, **kw) -> "AsyncLLM":
        return cls(args, **kw)

    # -- the output loop ------------------------------------------------------------------------
    def start(self) -> None:
        """Start reading engine outputs (needs the running event loop; generate() calls it)."""
        if not self._loop_tasks or all(t.done() for t in self._loop_tasks):
            loop = asyncio.get_running_loop()
            self._loop_tasks = [loop.create_task(self._output_loop(i)) for i in range(len(self.clients))]

    async def _output_loop(self, engine: int) -> None:
        client = self.clients[engine]
        try:
            while True:
                outs = await client.get_output()
                if not self._handle(outs, engine):
                    return
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - the engine is unusable from here on
            logger.exception("engine output loop failed")
            self._on_dead(f"engine output loop failed: {e!r}")

    def _handle(self, outs: EngineCoreOutputs, engine: int = 0) -> bool:
        if outs.engine_dead:
            self._on_dead(outs.engine_dead)
            return False
        if outs.scheduler_stats is not None:
            self._stats[engine] = outs.scheduler_stats
            if outs.scheduler_stats.step_kind or outs.scheduler_stats.step_encoder_seconds:
                for fn in self._step_listeners:
                    try:
                        fn(outs.scheduler_stats)
                    except Exception:  # a broken listener must not stop the engine
                        logger.exception("step listener failed")
        if outs.utility_output is not None:
            fut = self._utility.pop(outs.utility_output.call_id, None)
            if fut is not None and not fut.done():
                u = outs.utility_output
                fut.set_exception(RuntimeError(u.failure)) if u.failure else fut.set_result(u.result)
        if outs.outputs:
            op = self.output_processor
            for o in outs.outputs:
                if o.finish_reason is not None and self._engine_of.pop(o.request_id, None) is not None:
                    self._load[engine] -= 1
            results, to_abort = op.process_outputs(outs.outputs, outs.timestamp)
            for out in results:
                c = self._collectors.get(out.request_id)
                if c is None:
                    continue
                err = op.failed.pop(out.request_id, None)
                if err is None:
                    c.put(out)
                elif out.request_id in op.invalid:  # the request's own error: a 400 ("field: why")
                    c.put(ValueError(err))
                else:
                    c.put(RequestFailedError(f"the engine could not run this request ({err})"))
            op.failed.clear()
            op.invalid.clear()
            self._abort_engine_ids(to_abort)
        return True

    def _abort_engine_ids(self, engine_ids: list[str]) -> None:
        by_engine: dict[int, list[str]] = {}
        for eid in engine_ids:
            e = self._engine_of.pop(eid, None)
            if e is not None:
                self._load[e] -= 1
                by_engine.setdefault(e, []).append(eid)
        for e, ids in by_engine.items():
            self.clients[e].abort_requests(ids)

    def _on_dead(self, reason: str) -> None:
        if self._dead is not None:
            return
        self._dead = reason
        for c in self._collectors.values():
            c.put(EngineDeadError(reason))
        for fn in self._dead_listeners:
            try:
                fn(reason)
            except Exception:  # noqa: BLE001
                logger.exception("engine-dead listener failed")

    # -- requests -------------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    async def _run(self, request_id: str, prompt: PromptType,
                   params: Union[SamplingParams, PoolingParams]) -> AsyncIterator:
        self._check_alive()
        self.start()
        if request_id in self._collectors:
            raise ValueError(f"request_id {request_id!r} is already in use")
        arrival = time.time()
        text, ids, reqs = self.processor.process(request_id, prompt, params, arrival)  # ValueError: 400
        collector = RequestCollector()
        self._collectors[request_id] = collector
        self.output_processor.add_request(request_id, text, ids, params, [r.request_id for r in reqs],
                                          arrival)
        finished = False
        try:
            for r in reqs:  # to the engine core with the fewest requests in flight
                e = min(range(len(self.clients)), key=self._load.__getitem__) if len(self.clients) > 1 else 0
                self._engine_of[r.request_id] = e
                self._load[e] += 1
                self.clients[e].add_request(r)
            while True:
                out = await collector.get()
                finished = out.finished
                yield out
                if finished:
                    return
        except (EngineDeadError, RequestFailedError):
            finished = True  # nothing left to abort
            raise
        finally:
            self._collectors.pop(request_id, None)
            if not finished:
                self._abort_now(request_id)

    def generate(self, prompt: PromptType, sampling_params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; the last has finished=True."""
        return self._run(request_id, prompt, sampling_params)

    def encode(self, prompt: PromptType, pooling_params: PoolingParams,
               request_id: str) -> AsyncIterator[PoolingRequestOutput]:
        """A pooling request (embedding): one output, when it is done."""
        return self._run(request_id, prompt, pooling_params)

    def _abort_now(self, request_id: str) -> None:
        ids, _ = self.output_processor.abort_request(request_id)
        self._abort_engine_ids(ids)

    async def abort(self, request_id: str) -> None:
        c = self._collectors.get(request_id)
        ids, out = self.output_processor.abort_request(request_id)
        self._abort_engine_ids(ids)
        if c is not None and out is not None:
            c.put(out)

    # -- state ----------------------------------------------------------------------------------
    def is_healthy(self) -> bool:
        return self._dead is None and all(h.is_alive() for h in self.handles)

    @property
    def engine_core_pid(self) -> Optional[int]:
        return self.handle.pid if self.handle is not None else None

    def get_stats(self) -> SchedulerStats:
        """The engine cores' latest stats (summed over data-parallel ranks)."""
        if len(self._stats) == 1:
            return self._stats[0]
        total = SchedulerStats()
        blocks = sum(s.num_gpu_blocks for s in self._stats) or 1
        for s in self._stats:
            for f in ("num_running", "num_waiting", "num_gpu_blocks", "prefix_cache_queries",
                      "prefix_cache_hits", "num_preemptions", "prompt_tokens_total",
                      "generation_tokens_total", "step_prompt_tokens", "step_generation_tokens"):
                setattr(total, f, getattr(total, f) + getattr(s, f))
            total.kv_cache_usage += s.kv_cache_usage * s.num_gpu_blocks / blocks
        return total

    def add_step_listener(self, fn: Callable[[SchedulerStats], None]) -> None:
        self._step_listeners.append(fn)

    def add_dead_listener(self, fn: Callable[[str], None]) -> None:
        self._dead_listeners.append(fn)

    def num_in_flight(self) -> int:
        return len(self._collectors)

    async def call_utility(self, method: str, *args):
        """Call an engine-core utility (of the first data-parallel rank)."""
        self.start()
        fut = asyncio.get_running_loop().create_future()
        self._utility[self.client.call_utility(method, *args)] = fut
        return await fut

    async def shutdown(self, drain_timeout_s: float = 30) -> None:
        """Let in-flight requests finish (up to drain_timeout_s), abort the rest, stop the core."""
        deadline = time.time() + drain_timeout_s
        while self._collectors and time.time() < deadline and self.is_healthy():
            await asyncio.sleep(0.05)
        for rid in list(self._collectors):
            await self.abort(rid)
        await asyncio.sleep(0)  # let aborted streams see their last output
        for t in self._loop_tasks:
            t.cancel()
        loop = asyncio.get_running_loop()
        for h in self.handles:
            await loop.run_in_executor(None, h.close)
        for c in self.clients:
            c.close()
