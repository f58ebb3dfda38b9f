"""Run the server: load the engine, build the app, serve it with uvicorn, drain on SIGTERM.

Also the vLLM-style entry point:
    python -m pagoda.entrypoints.openai.api_server --model MODEL [flags]
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Callable

import uvicorn

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


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s",
                                           datefmt="%m-%d %H:%M:%S"))
    root = logging.getLogger("pagoda")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def run_server(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; returns 0 after a graceful drain."""
    _configure_logging(args.log_level)
    # Threads of this process that run Python (event loop, tokenizer, template rendering, the
    # CPU engine's step loop) hand the GIL over every 0.5 ms instead of 5: a template rendering
    # for seconds then delays a normal chat by ~0.1 s instead of ~4 s (tests/test_hostile_inputs.py)
    sys.setswitchinterval(0.0005)
    from pagoda.config import EngineArgs
    engine_args = EngineArgs.from_cli_args(args)  # bad values: ValueError naming the flag, before torch loads

    from pagoda.engine.embedding_engine import is_embedding_model

    from .server import build_app

    if is_embedding_model(engine_args):  # an encoder (BERT): /v1/embeddings, no KV cache
        from pagoda.engine.async_embedding_engine import AsyncEmbeddingEngine
        engine = AsyncEmbeddingEngine.from_engine_args(engine_args)
    else:
        from pagoda.engine.async_engine import AsyncLLMEngine
        engine = AsyncLLMEngine.from_engine_args(engine_args)
    app = build_app(engine, args)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            access_log=not args.disable_log_requests,
                            ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
                            timeout_graceful_shutdown=args.shutdown_timeout + STREAM_END_GRACE_S,
                            timeout_keep_alive=10, limit_concurrency=args.max_connections)
    server = _DrainingServer(config, on_signal=app.state.start_draining)
    # uvicorn re-raises the signal it handled once it has shut down; a drained shutdown is a
    # normal exit, so make that re-raise a no-op and return 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    logger.info("serving %s on %s://%s:%d", ", ".join(engine.model_config.served_model_names),
                "https" if args.ssl_certfile else "http", args.host, args.port)
    server.run()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    from .cli_args import HelpFormatter, add_serve_args, resolve_args
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
