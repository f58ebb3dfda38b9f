"""`pagoda serve --api-server-count N`: N API server processes in front of one engine core.

This process starts the engine core (its own process), binds the listening socket once and
spawns N API servers that all accept on it; each has its own output socket from the engine
core (its client index). Prometheus metrics are kept in multiprocess mode, so any of them
answers /metrics for all. SIGTERM is passed on to the API servers, which drain as one would;
if the engine core dies, each API server fails its requests and exits non-zero, and so does
this process.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time

from pagoda.config import EngineArgs

logger = logging.getLogger("pagoda.server")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _serve_one(args: argparse.Namespace, engine_args: EngineArgs, sock: socket.socket, addresses,
               index: int, ready, metrics_dir: str) -> None:
    """One API server process (spawned): attach to the engine core, serve on the shared socket."""
    os.environ[METRICS_DIR_ENV] = metrics_dir  # before prometheus_client is imported
    import sys
    from pagoda.engine.async_llm import AsyncLLM
    from pagoda.entrypoints.openai.api_server import serve_app
    from pagoda.log import configure_logging
    configure_logging(args.log_level)
    sys.setswitchinterval(0.0005)
    engine = AsyncLLM(engine_args, addresses=addresses, client_index=index, ready=ready)
    code = serve_app(engine, args, sockets=[sock])
    for c in engine.clients:
        c.close()
    os._exit(code)


def run_api_servers(args: argparse.Namespace, engine_args: EngineArgs) -> int:
    from pagoda.config import data_parallel_rank_args
    from pagoda.engine.core_client import EngineCoreHandle
    n = args.api_server_count
    handles = [EngineCoreHandle(data_parallel_rank_args(engine_args, r), num_clients=n, mode="process",
                                log_level=args.log_level, wait=False)
               for r in range(engine_args.data_parallel_size)]
    try:
        for h in handles:
            h.wait_ready()
    except BaseException:
        for h in handles:
            h.close()
        raise
    addresses = [h.addresses for h in handles]
    metrics_dir = tempfile.mkdtemp(prefix="pagoda-metrics-")
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.create_server((args.host, args.port), family=family, backlog=2048)
    sock.set_inheritable(True)
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=_serve_one, name=f"pagoda-api-{i}",
                           args=(args, engine_args, sock, addresses, i, handles[0].ready, metrics_dir))
             for i in range(n)]
    for p in procs:
        p.start()
    logger.info("%d API servers (pids %s) in front of %d engine core(s) (pids %s) on %s:%d", n,
                ", ".join(str(p.pid) for p in procs), len(handles), ", ".join(str(h.pid) for h in handles),
                args.host, args.port)
    stopping = False

    def forward(sig, _frame):
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    try:
        while any(p.is_alive() for p in procs):
            for p in procs:
                if not p.is_alive() and p.exitcode not in (0, None) and not stopping:
                    code = p.exitcode  # one failed (the engine died, or it crashed): stop all
                    forward(signal.SIGTERM, None)
            time.sleep(0.2)
        if not stopping:
            code = code or max((p.exitcode or 0) for p in procs)
    finally:
        for p in procs:
            p.join(args.shutdown_timeout + 10)
            if p.is_alive():
                p.kill()
        sock.close()
        for h in handles:
            h.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return code
