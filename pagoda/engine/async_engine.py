"""The engine behind asyncio: one engine thread runs `step()` back to back; the HTTP event loop
only tokenizes, queues commands and awaits per-request output queues, so it never waits for the
model. torch releases the GIL inside its kernels, which keeps the event loop responsive.

A request whose consumer goes away (client disconnect, cancelled task, closed generator) is
aborted at once: its KV blocks are free before the next step.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import queue
import threading
import time
from typing import AsyncIterator, Callable, Optional

from pagoda.config import EngineArgs
from pagoda.engine.engine import EngineStats, LLMEngine, PromptType, StepStats
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams

logger = logging.getLogger("pagoda.async_engine")


class EngineDeadError(RuntimeError):
    pass


class RequestFailedError(RuntimeError):
    """One request failed inside the engine (its neighbours in the batch went on)."""


def release_openmp_pool() -> None:
    """Free the calling thread's OpenMP worker pool (OpenMP 5's omp_pause_resource_all).

    libgomp keeps one worker pool per thread that ran a parallel region. The model is loaded on
    the main thread and runs on a worker thread (the engine's, the embedding engine's), so two
    pools stay alive; libgomp then counts
    more threads than CPUs and stops spinning between parallel regions, and every region waits on
    a futex wake: on 2 cores a decode step ran ~40% slower than on the main thread (see
    BENCHMARKS.md). Without libgomp (or an older one) this does nothing."""
    try:
        gomp = ctypes.CDLL("libgomp.so.1")  # the copy torch already loaded, by its soname
        gomp.omp_pause_resource_all(1)      # omp_pause_soft
    except (OSError, AttributeError):
        pass


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.engine_args = engine.args
        self._commands: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._dead: Optional[BaseException] = None
        self._stats = engine.get_stats()
        if engine.device.type == "cpu":
            release_openmp_pool()
        self._thread = threading.Thread(target=self._loop, name="pagoda-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "AsyncLLMEngine":
        return cls(LLMEngine(args))

    # -- engine thread --------------------------------------------------------------------------
    def _deliver(self, rid: str, item) -> None:
        entry = self._queues.get(rid)
        if entry is not None:
            loop, q = entry
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the loop is closed
                pass

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            kind, arg = cmd
            if kind == "add":
                try:
                    self.engine.add_prepared(arg)
                except Exception as e:
                    self._deliver(arg.request_id, e)
            elif kind == "abort":
                out = self.engine.abort_request(arg)
                if out is not None:  # a consumer still waiting (server shutdown) ends on it
                    self._deliver(arg, out)

    def _loop(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not eng.has_unfinished_requests():
                    self._stats = eng.get_stats()
                    self._wake.wait(0.1)
                    self._wake.clear()
                    continue
                try:
                    outputs = eng.step()
                except Exception as e:
                    # the engine retries a failed step request by request; an error escaping
                    # that is the engine's own: fail what is in flight, keep the process
                    logger.exception("engine step failed; aborting the requests in flight")
                    for rid in list(eng.requests):
                        eng.abort_request(rid)
                        self._deliver(rid, RuntimeError(f"engine step failed: {e}"))
                    outputs = []
                for rid, err in eng.failed.items():
                    self._deliver(rid, RequestFailedError(f"the engine could not run this request "
                                                          f"({type(err).__name__}: {err})"))
                eng.failed.clear()
                self._stats = eng.get_stats()
                for out in outputs:
                    self._deliver(out.request_id, out)
        except BaseException as e:  # pragma: no cover - fatal
            logger.exception("engine loop died")
            self._dead = e
            for rid in list(self._queues):
                self._deliver(rid, EngineDeadError(str(e)))

    # -- public API -----------------------------------------------------------------------------
    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    def get_stats(self) -> EngineStats:
        return self._stats

    def add_step_listener(self, fn: Callable[[StepStats], None]) -> None:
        self.engine.step_listeners.append(fn)

    def num_in_flight(self) -> int:
        return len(self._queues)

    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        if not self.is_healthy():
            raise EngineDeadError("the engine is not running")
        if request_id in self._queues:
            raise ValueError(f"request_id {request_id!r} is already in use")
        req = self.engine.prepare_request(request_id, prompt, params, time.time())  # may raise
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), q)
        finished = False
        try:
            self._commands.put(("add", req))
            self._wake.set()
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    async def shutdown(self, drain_timeout_s: float = 30) -> None:
        """Let in-flight requests finish (up to drain_timeout_s), abort the rest, stop the thread."""
        deadline = time.time() + drain_timeout_s
        while self._queues and time.time() < deadline and self.is_healthy():
            await asyncio.sleep(0.05)
        for rid in list(self._queues):
            await self.abort(rid)
        self._stop.set()
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5)
