"""The embedding engine behind asyncio, for the server.

One worker thread runs the forwards; the event loop only checks inputs and awaits a future. Each
time the worker wakes it takes every request queued meanwhile and embeds them together, so
concurrent clients share padded batches (the embedding counterpart of continuous batching).
It offers the parts of AsyncLLMEngine's surface that the server's shared code reads (tokenizer,
model_config, stats, health, shutdown).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Optional

import torch

from pagoda.config import EngineArgs
from pagoda.engine.async_engine import release_openmp_pool
from pagoda.engine.embedding_engine import EmbeddingEngine
from pagoda.engine.engine import EngineStats, StepStats

logger = logging.getLogger("pagoda.async_engine")


class AsyncEmbeddingEngine:
    def __init__(self, engine: EmbeddingEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.engine_args = engine.args
        self.embedding_size = engine.embedding_size
        self._jobs: "queue.SimpleQueue[Optional[tuple[list[list[int]], Future]]]" = queue.SimpleQueue()
        self._in_flight = 0
        self._dead: Optional[BaseException] = None
        if engine.device.type == "cpu":  # loaded here, run on the worker: one OpenMP pool only
            release_openmp_pool()
        self._thread = threading.Thread(target=self._loop, name="pagoda-embedding", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "AsyncEmbeddingEngine":
        return cls(EmbeddingEngine(args))

    # -- worker thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                job = self._jobs.get()
                jobs = [job]
                while True:  # everything that queued up while the last batch ran
                    try:
                        jobs.append(self._jobs.get_nowait())
                    except queue.Empty:
                        break
                live = [j for j in jobs if j is not None and j[1].set_running_or_notify_cancel()]
                if live:
                    self._run(live)
                if None in jobs:
                    return
        except BaseException as e:  # pragma: no cover - fatal
            logger.exception("embedding loop died")
            self._dead = e

    def _run(self, jobs: list[tuple[list[list[int]], Future]]) -> None:
        inputs = [ids for job_inputs, _ in jobs for ids in job_inputs]
        try:
            vectors = self.engine.embed_ids(inputs)
        except Exception as e:  # keep serving: fail these requests, not the process
            logger.exception("embedding batch failed")
            for _, fut in jobs:
                fut.set_exception(RuntimeError(f"embedding forward failed: {e}"))
            return
        start = 0
        for job_inputs, fut in jobs:
            fut.set_result(vectors[start:start + len(job_inputs)])
            start += len(job_inputs)

    # -- public API ------------------------------------------------------------------------------
    async def embed(self, inputs: list[list[int]]) -> list[torch.Tensor]:
        """Embeddings of token-id lists, in order; ValueError (before queueing) on bad input."""
        if not self.is_healthy():
            raise RuntimeError("the embedding engine is not running")
        self.engine.check(inputs)
        fut: Future = Future()
        self._in_flight += 1
        try:
            self._jobs.put((inputs, fut))
            return await asyncio.wrap_future(fut)
        finally:
            self._in_flight -= 1

    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    def get_stats(self) -> EngineStats:
        return self.engine.get_stats()

    def add_step_listener(self, fn: Callable[[StepStats], None]) -> None:
        self.engine.step_listeners.append(fn)

    def num_in_flight(self) -> int:
        return self._in_flight

    async def shutdown(self, drain_timeout_s: float = 30) -> None:
        """Let queued requests finish (up to drain_timeout_s), then stop the worker."""
        deadline = time.time() + drain_timeout_s
        while self._in_flight and time.time() < deadline and self.is_healthy():
            await asyncio.sleep(0.05)
        self._jobs.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5)
