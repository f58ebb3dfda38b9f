"""How front ends talk to the engine core.

- `InprocClient`: the offline `LLM` drives an EngineCore in its own thread, no IPC.
- `EngineCoreHandle` starts an engine core in a process of its own (or a thread) behind ZMQ,
  waits for its handshake and watches it: if the process dies, every API server is told with an
  `engine_dead` message on its output socket, so requests in flight end with an error at once.
- `AsyncMPClient`: one API server's side of those sockets (asyncio).
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional

from pagoda.config import EngineArgs
from pagoda.engine.messages import (EngineCoreOutputs, EngineCoreRequest, EngineReady, Encoder,
                                    RequestType, UtilityCall, decoder)

logger = logging.getLogger("pagoda.engine")


class EngineDeadError(RuntimeError):
    """The engine core is gone; nothing can be served until the server restarts."""


def engine_core_mode(flag: str, device: str) -> str:
    """--engine-core auto: its own process on a GPU (host work runs beside the GPU's), a thread on
    the CPU, where both would share the same few cores (BENCHMARKS.md: C1 both ways)."""
    if flag != "auto":
        return flag
    if device.startswith("cuda"):
        return "process"
    if device == "cpu":
        return "thread"
    import torch
    return "process" if torch.cuda.is_available() else "thread"



class InprocClient:
    def __init__(self, args: EngineArgs):
        from pagoda.engine.core import EngineCore
        self.core = EngineCore(args)

    def add_request(self, request: EngineCoreRequest) -> None:
        self.core.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self.core.abort_requests(request_ids)

    def step(self) -> EngineCoreOutputs:
        return self.core.step()

    def has_work(self) -> bool:
        return self.core.has_work()


@dataclass
class EngineAddresses:
    input: str
    outputs: list[str]
    ready: str


def _ipc_addresses(num_clients: int) -> tuple[str, EngineAddresses]:
    d = tempfile.mkdtemp(prefix="pagoda-zmq-")
    return d, EngineAddresses(f"ipc://{d}/in", [f"ipc://{d}/out{i}" for i in range(num_clients)],
                              f"ipc://{d}/ready")


class EngineCoreHandle:
    """Starts the engine core (a spawned process, or a thread with `mode="thread"`), waits for
    it to be ready and watches it for the rest of its life."""

    def __init__(self, args: EngineArgs, num_clients: int = 1, mode: str = "process",
                 log_level: str = "INFO", wait: bool = True):
        import zmq
        from pagoda.engine.core import run_engine_core
        if mode not in ("process", "thread"):
            raise ValueError(f"engine core mode must be process or thread, got {mode!r}")
        self.mode = mode
        self._dir, self.addresses = _ipc_addresses(num_clients)
        self._ready_sock = zmq.Context.instance().socket(zmq.PULL)
        self._ready_sock.bind(self.addresses.ready)
        self.proc: Optional[multiprocessing.Process] = None
        self.thread: Optional[threading.Thread] = None
        self._thread_error: Optional[BaseException] = None
        self._dead_reason: Optional[str] = None
        self.ready: Optional[EngineReady] = None
        target_args = (args, self.addresses.input, self.addresses.outputs, self.addresses.ready, log_level)
        if mode == "process":
            spawn = multiprocessing.get_context("spawn")
            self.proc = spawn.Process(target=run_engine_core, args=target_args, name="pagoda-engine-core",
                                      daemon=True)
            self.proc.start()
        else:
            def run():
                try:
                    run_engine_core(*target_args)
                except BaseException as e:  # noqa: BLE001 - reported as engine death
                    logger.exception("engine core thread died")
                    self._thread_error = e
            self.thread = threading.Thread(target=run, name="pagoda-engine-core", daemon=True)
            self.thread.start()
        if wait:
            self.wait_ready()

    def wait_ready(self) -> EngineReady:
        """Block until the engine core reports ready (or raise what stopped it), then watch it."""
        try:
            self.ready = self._wait_ready(self._ready_sock)
        finally:
            self._ready_sock.close()
        self._watcher = threading.Thread(target=self._watch, name="pagoda-engine-watch", daemon=True)
        self._watcher.start()
        return self.ready

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def _alive(self) -> bool:
        if self.proc is not None:
            return self.proc.is_alive()
        return self.thread is not None and self.thread.is_alive()

    def _wait_ready(self, sock) -> EngineReady:
        import zmq
        while True:
            if sock.poll(200, zmq.POLLIN):
                kind, payload = sock.recv_multipart()
                if kind == b"ready":
                    return decoder(EngineReady).decode(payload)
                self.close()
                raise ValueError(payload.decode(errors="replace"))
            if not self._alive():
                code = self.proc.exitcode if self.proc is not None else None
                self.close()
                raise RuntimeError(f"the engine core exited while starting (exit code {code}); "
                                   "see the log above")

    def _watch(self) -> None:
        if self.proc is not None:
            from multiprocessing.connection import wait
            wait([self.proc.sentinel])
            self.proc.join(1)
            reason = f"the engine core process exited (exit code {self.proc.exitcode})"
        else:
            self.thread.join()
            reason = f"the engine core thread stopped ({self._thread_error!r})"
        if self._closing:
            return
        self._dead_reason = reason
        logger.error("%s: failing requests in flight", reason)
        import zmq
        ctx = zmq.Context.instance()
        msg = Encoder()(EngineCoreOutputs(timestamp=time.time(), engine_dead=reason))
        for addr in self.addresses.outputs:
            s = ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 1000)
            s.connect(addr)
            s.send(msg)
            s.close()

    _closing = False

    def is_alive(self) -> bool:
        return self._dead_reason is None and self._alive()

    def close(self, timeout: float = 5.0) -> None:
        """Ask the engine core to stop, then make sure it has."""
        self._closing = True
        import zmq
        if self._alive():
            s = zmq.Context.instance().socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 500)
            s.connect(self.addresses.input)
            s.send_multipart([int(RequestType.SHUTDOWN).to_bytes(1, "little"), b""])
            s.close()
        if self.proc is not None:
            self.proc.join(timeout)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(2)
        elif self.thread is not None:
            self.thread.join(timeout)
        shutil.rmtree(self._dir, ignore_errors=True)


class AsyncMPClient:
    """One API server's connection to the engine core: requests out on the shared input socket,
    this server's step outputs in on its own socket."""

    def __init__(self, addresses: EngineAddresses, client_index: int = 0):
        import zmq
        import zmq.asyncio
        self.client_index = client_index
        self._sync_ctx = zmq.Context.instance()
        self._actx = zmq.asyncio.Context.instance()
        self.input = self._sync_ctx.socket(zmq.PUSH)
        self.input.setsockopt(zmq.LINGER, 1000)
        self.input.connect(addresses.input)
        self.output = self._actx.socket(zmq.PULL)
        self.output.bind(addresses.outputs[client_index])
        self._enc = Encoder()
        self._dec = decoder(EngineCoreOutputs)
        self._calls = 0
        self._send_lock = threading.Lock()

    def _send(self, kind: RequestType, payload: bytes) -> None:
        with self._send_lock:  # zmq sockets are not thread-safe
            self.input.send_multipart([int(kind).to_bytes(1, "little"), payload], copy=False)

    def add_request(self, request: EngineCoreRequest) -> None:
        request.client_index = self.client_index
        self._send(RequestType.ADD, self._enc(request))

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self._send(RequestType.ABORT, self._enc(request_ids))

    def call_utility(self, method: str, *args) -> int:
        self._calls += 1
        self._send(RequestType.UTILITY, self._enc(UtilityCall(self._calls, method, list(args))))
        return self._calls

    async def get_output(self) -> EngineCoreOutputs:
        frame = await self.output.recv(copy=False)
        return self._dec.decode(frame.buffer)

    def close(self) -> None:
        self.input.close()
        self.output.close()
