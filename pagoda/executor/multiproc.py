"""The executor for --tensor-parallel-size N: one worker per rank, each in its own process (rank 0,
the driver, in the engine core's), joined in one torch.distributed group.

Every rank must run the same steps in the same order — each samples the same tokens from the
same all-gathered logits and seeds, and feeds them to its next step from its own device memory.
So the driver publishes each call it makes on its own worker (launch step k, resolve step k,
other methods) and the other ranks replay them in order. Ranks on other hosts (--nnodes) are
started there with `pagoda serve ... --node-rank R` and connect to --master-addr.
"""
from __future__ import annotations

import logging
import multiprocessing
import pickle
import threading
from typing import Any

from pagoda.config import EngineArgs
from pagoda.distributed.parallel_state import ParallelConfig

logger = logging.getLogger("pagoda.executor")


def parallel_configs(args: EngineArgs) -> list[ParallelConfig]:
    """The ranks of this host: node R runs ranks R*n .. R*n + n - 1 (n = tp / nnodes)."""
    tp, nodes = args.tensor_parallel_size, args.nnodes
    per_node = tp // nodes
    backend = "nccl" if args.device.startswith("cuda") or (args.device == "auto" and _has_cuda()) else "gloo"
    return [ParallelConfig(tp, args.node_rank * per_node + i, i, args.master_addr, args.master_port, backend)
            for i in range(per_node)]


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _control_addresses(args: EngineArgs) -> tuple[str, str]:
    """(calls from the driver, replies to it): two ports above --master-port."""
    return (f"tcp://{args.master_addr}:{args.master_port + 1}",
            f"tcp://{args.master_addr}:{args.master_port + 2}")


def run_worker(args: EngineArgs, parallel: ParallelConfig, log_level: str = "INFO") -> None:
    """A non-driver rank: build its worker, say ready, then replay the driver's calls."""
    import zmq
    from pagoda.log import configure_logging
    from pagoda.worker.worker import Worker
    configure_logging(log_level)
    calls_addr, replies_addr = _control_addresses(args)
    ctx = zmq.Context()
    calls = ctx.socket(zmq.SUB)
    calls.setsockopt(zmq.LINGER, 0)
    calls.setsockopt(zmq.SUBSCRIBE, b"")
    calls.connect(calls_addr)
    replies = ctx.socket(zmq.PUSH)
    replies.setsockopt(zmq.LINGER, 1000)
    replies.connect(replies_addr)
    try:
        worker = Worker(args, parallel)
    except BaseException as e:  # noqa: BLE001 - reported to the driver, which fails the start
        replies.send(pickle.dumps((parallel.rank, "error", f"{type(e).__name__}: {e}")))
        raise
    replies.send(pickle.dumps((parallel.rank, "ready", None)))
    pending: dict[int, Any] = {}
    while True:
        kind, *rest = pickle.loads(calls.recv())
        if kind == "launch":
            step, sched = rest
            pending[step] = worker.execute_model(sched)
        elif kind == "resolve":
            pending.pop(rest[0]).result()
        elif kind == "call":
            method, a = rest
            try:
                result = getattr(worker, method)(*a)
                replies.send(pickle.dumps((parallel.rank, "result", result)))
            except BaseException as e:  # noqa: BLE001
                replies.send(pickle.dumps((parallel.rank, "error", f"{type(e).__name__}: {e}")))
        elif kind == "shutdown":
            break
    from pagoda.distributed.parallel_state import destroy_tensor_parallel
    destroy_tensor_parallel()


def run_node(args: EngineArgs, log_level: str = "INFO") -> int:
    """`pagoda serve --node-rank R` (R > 0): this host's ranks only, until the driver stops."""
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=run_worker, args=(args, p, log_level), name=f"pagoda-tp{p.rank}")
             for p in parallel_configs(args)]
    for p in procs:
        p.start()
    logger.info("node %d: tensor-parallel ranks %s waiting for %s:%d", args.node_rank,
                [c.rank for c in parallel_configs(args)], args.master_addr, args.master_port)
    for p in procs:
        p.join()
    return max((p.exitcode or 0) for p in procs)


class _MirroredStep:
    """The driver's pending step; resolving it tells the other ranks to resolve theirs."""

    def __init__(self, executor: "MultiprocExecutor", step: int, pending):
        self.executor, self.step, self.pending = executor, step, pending
        self.output = pending.output

    def result(self):
        self.executor._publish(("resolve", self.step))
        return self.pending.result()


class MultiprocExecutor:
    def __init__(self, args: EngineArgs, log_level: str = "INFO"):
        import zmq
        from pagoda.worker.worker import Worker
        configs = parallel_configs(args)
        calls_addr, replies_addr = _control_addresses(args)
        self._ctx = zmq.Context()
        self._calls = self._ctx.socket(zmq.PUB)
        self._calls.setsockopt(zmq.LINGER, 1000)  # never block exit on a rank that is gone
        self._calls.bind(calls_addr.replace(args.master_addr, "*", 1))
        self._replies = self._ctx.socket(zmq.PULL)
        self._replies.setsockopt(zmq.LINGER, 0)
        self._replies.bind(replies_addr.replace(args.master_addr, "*", 1))
        self._lock = threading.Lock()
        self._step = 0
        self.world_size = args.tensor_parallel_size
        spawn = multiprocessing.get_context("spawn")
        self._procs = [spawn.Process(target=run_worker, args=(args, p, log_level), name=f"pagoda-tp{p.rank}",
                                     daemon=True) for p in configs[1:]]
        for p in self._procs:
            p.start()
        try:
            self.driver_worker = Worker(args, configs[0])  # joins the group with the others
            self._wait_all("ready")
        except BaseException:
            self.shutdown()
            raise
        logger.info("tensor parallel: %d ranks (%s)", self.world_size, configs[0].backend)

    def _publish(self, msg) -> None:
        with self._lock:
            self._calls.send(pickle.dumps(msg))

    def _wait_all(self, expect: str) -> list:
        """One reply per non-driver rank; an error from any of them fails the call."""
        results = []
        for _ in range(self.world_size - 1):
            rank, kind, value = pickle.loads(self._replies.recv())
            if kind == "error":
                raise RuntimeError(f"tensor-parallel rank {rank}: {value}")
            results.append(value)
        return results

    def _call(self, method: str, *args):
        """Run a worker method on every rank at once (they may meet in collectives)."""
        self._publish(("call", method, args))
        mine = getattr(self.driver_worker, method)(*args)
        self._wait_all("result")
        return mine

    def determine_num_blocks(self) -> int:
        return self._call("determine_num_blocks")

    def initialize_cache(self, num_blocks: int) -> None:
        self._call("initialize_cache", num_blocks)

    def warm_up(self) -> None:
        self._call("warm_up")

    def execute_model(self, scheduler_output):
        if scheduler_output.grammar is not None:
            # the other ranks must mask the same rows (their next inputs are their own samples),
            # so the bitmask is filled before it is sent: structured steps are not overlapped here
            scheduler_output.grammar.get()
        self._step += 1
        self._publish(("launch", self._step, scheduler_output))
        return _MirroredStep(self, self._step, self.driver_worker.execute_model(scheduler_output))

    def shutdown(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        try:
            self._publish(("shutdown",))
        except Exception:  # noqa: BLE001
            pass
        for p in self._procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        self._calls.close()
        self._replies.close()
        self._ctx.term()
        from pagoda.distributed.parallel_state import destroy_tensor_parallel
        destroy_tensor_parallel()  # this process may build another group later (another LLM)
