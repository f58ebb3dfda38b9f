"""Run the server: load the engine, build the app, serve it with uvicorn, drain on SIGTERM.

Also the vLLM-style entry point:
    python -m pagoda.entrypoints.openai.api_server --model MODEL [flags]
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Callable, Optional

import uvicorn

from pagoda.log import configure_logging

from .cli_args import HelpFormatter, add_serve_args, resolve_args

logger = logging.getLogger("pagoda.server")


# After --shutdown-timeout the app ends the streams still running (finish_reason "abort", then
# [DONE]); uvicorn waits this much longer for those last events before it cancels anything.
STREAM_END_GRACE_S = 5.0


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app the moment a shutdown signal arrives, so new
    completions get 503 while in-flight ones finish (uvicorn stops accepting connections)."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]):
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig, frame) -> None:
        self._on_signal()
        super().handle_exit(sig, frame)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        from pagoda.startup import process_age
        age = process_age()
        if self.started and age is not None:  # the whole start: interpreter, imports, engine, server
            logger.info("ready %.1fs after the process started", age)


def run_server(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; returns 0 after a graceful drain, 3 if the engine died."""
    configure_logging(args.log_level)
    # Threads of this process that run Python (event loop, tokenizer, template rendering, the
    # CPU engine's step loop) hand the GIL over every 0.5 ms instead of 5: a template rendering
    # for seconds then delays a normal chat by ~0.1 s instead of ~4 s (tests/test_hostile_inputs.py)
    sys.setswitchinterval(0.0005)
    from pagoda.config import EngineArgs
    engine_args = EngineArgs.from_cli_args(args)  # bad values: ValueError naming the flag, before torch loads
    if engine_args.node_rank > 0:  # another host's tensor-parallel ranks: no API server here
        from pagoda.executor.multiproc import run_node
        return run_node(engine_args, args.log_level)
    if args.api_server_count > 1:
        from .multi_server import run_api_servers
        return run_api_servers(args, engine_args)

    from pagoda.engine.async_llm import AsyncLLM
    from pagoda.engine.core_client import engine_core_mode
    engine = AsyncLLM(engine_args, engine_core=engine_core_mode(args.engine_core, engine_args.device),
                      log_level=args.log_level)
    return serve_app(engine, args)


def serve_app(engine, args: argparse.Namespace, sockets: Optional[list] = None) -> int:
    """Run the HTTP app for a running engine (on `sockets` when a parent process bound them)."""
    from .server import build_app
    app = build_app(engine, args)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            access_log=not args.disable_log_requests,
                            ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
                            timeout_graceful_shutdown=args.shutdown_timeout + STREAM_END_GRACE_S,
                            timeout_keep_alive=10, limit_concurrency=args.max_connections)
    server = _DrainingServer(config, on_signal=app.state.start_draining)
    died: list[str] = []

    def on_engine_dead(reason: str) -> None:
        """Requests in flight have their errors; /health answers 503 for a moment so load
        balancers see it, then the server exits non-zero for Docker/compose to restart it."""
        died.append(reason)
        logger.error("engine core died (%s): exiting", reason)
        import asyncio
        asyncio.get_running_loop().call_later(1.0, setattr, server, "should_exit", True)
    engine.add_dead_listener(on_engine_dead)
    # uvicorn re-raises the signal it handled once it has shut down; a drained shutdown is a
    # normal exit, so make that re-raise a no-op and return 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    from pagoda.startup import freeze_after_start
    freeze_after_start()  # the engine and the app live as long as this process
    logger.info("serving %s on %s://%s:%d", ", ".join(engine.model_config.served_model_names),
                "https" if args.ssl_certfile else "http", args.host, args.port)
    server.run(sockets=sockets)
    if died:
        return 3
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagoda.entrypoints.openai.api_server",
                                     description="pagoda's OpenAI-compatible server (same as `pagoda serve`).",
                                     formatter_class=HelpFormatter)
    args = add_serve_args(parser).parse_args(argv)
    try:
        return run_server(resolve_args(args))
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
