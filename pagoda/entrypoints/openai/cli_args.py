"""`pagoda serve` arguments: the engine flags (defined once in pagoda.config) plus the server's.

Precedence, highest first: command line, ``--config`` YAML file, ``PAGODA_*`` environment
variables, built-in defaults. To know which flags the command line really set, every default is
wrapped in ``_Default`` before parsing and unwrapped afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

from pagoda.config import EngineArgs, Flag, add_flags, load_config_file, parse_bytes

from .reasoning_parsers import REASONING_PARSERS
from .tool_parsers import TOOL_CALL_PARSERS

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _origins(value: str | list) -> list[str]:
    """'*', 'http://a,http://b' or vLLM's JSON list '["http://a"]'."""
    if isinstance(value, list):
        return [str(v) for v in value]
    value = value.strip()
    if value.startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON list: {e}")
        return [str(v) for v in parsed]
    return [v.strip() for v in value.split(",") if v.strip()]


SERVER_FLAGS: list[Flag] = [
    Flag("host", str, "127.0.0.1", "Address to listen on. 127.0.0.1 accepts local clients only; "
         "0.0.0.0 (or ::) listens on all interfaces.", group="Server"),
    Flag("port", int, 8000, "TCP port to listen on.", group="Server"),
    Flag("api-key", str, None, "Require 'Authorization: Bearer <key>' on every route except "
         "/health, /ping and the chat page's static files (the page sends the key on its API "
         "calls).", group="Server"),
    Flag("config", str, None, "YAML file of flag: value pairs (flag names as on the command line); "
         "command-line flags override it.", group="Server"),
    Flag("root-path", str, None, "URL prefix when behind a path-based reverse proxy (e.g. /llm).",
         group="Server"),
    Flag("allowed-origins", _origins, ["*"], "CORS origins allowed to call the API from a browser: "
         "'*', a comma-separated list or a JSON list; '' disables CORS. Set it to your web app's "
         "origins when browsers can reach the server: with '*' any web page a user opens may call "
         "it (credentials are never allowed with '*').", group="Server"),
    Flag("ssl-keyfile", str, None, "TLS private key file (serve HTTPS with --ssl-certfile).",
         group="Server"),
    Flag("ssl-certfile", str, None, "TLS certificate file.", group="Server"),
    Flag("max-concurrent-requests", int, None, "Admission limit, in sequences: a completion "
         "counts prompts x n, a chat n, an embedding or /tokenize request 1; beyond it requests get "
         "429 with Retry-After, and one request larger than the limit a 400. Default: unlimited.",
         group="Server"),
    Flag("max-request-body-size", parse_bytes, 16 << 20, "Largest request body (e.g. 1MiB); larger "
         "gets 413.", group="Server"),
    Flag("request-body-timeout", float, 30.0, "Seconds a client has to send a whole request body; "
         "past it the request gets 408 and the connection is closed.", group="Server"),
    Flag("max-connections", int, None, "Open connections (or requests in progress) beyond which "
         "new requests get a plain 503 (uvicorn's limit_concurrency). Default: unlimited.",
         group="Server"),
    Flag("max-stop-strings", int, 64, "Most entries of `stop`, and of `stop_token_ids`, in one "
         "request (each generated token is checked against them); more gets 400.", group="Server"),
    Flag("max-stop-string-length", int, 1024, "Longest stop string, in characters; longer gets "
         "400.", group="Server"),
    Flag("max-audio-file-size", parse_bytes, 25 << 20, "Largest audio file accepted by "
         "/v1/audio/transcriptions and /v1/audio/translations (OpenAI's limit: 25 MB); larger "
         "gets 413.", group="Server"),
    Flag("shutdown-timeout", float, 30.0, "Seconds in-flight requests may take to finish after "
         "SIGTERM/SIGINT before they are aborted.", group="Server"),
    Flag("api-server-count", int, 1, "API server processes in front of one engine core, all on "
         "--port (vLLM's flag): more processes tokenize, detokenize and write JSON in parallel when "
         "one cannot keep up with the engine. Needs the engine core in its own process.",
         group="Server", aliases=("-asc",)),
    Flag("engine-core", str, "auto", "Where the engine core (scheduler + model) runs: process = its "
         "own process, so the API server's work (tokenizing, detokenizing, JSON) runs in parallel "
         "with the model; thread = inside the API server process; auto = process on GPUs, thread "
         "on the CPU.", group="Server", choices=("auto", "process", "thread")),
    Flag("enable-server-load-tracking", None, False, "Count the requests in flight on the model "
         "endpoints and report them on GET /load as {\"server_load\": N} (vLLM's flag; without it "
         "/load answers 0).", group="Server", boolean=True),
    Flag("disable-fastapi-docs", None, False, "Do not serve /docs, /redoc and /openapi.json.",
         group="Server", boolean=True),
    Flag("disable-frontend", None, False, "Do not serve the chat page at / and /chat.",
         group="Server", boolean=True),
    Flag("chat-template", str, None, "Chat template replacing the model's: a Jinja file or an "
         "inline template.", group="Chat"),
    Flag("trust-request-chat-template", None, False, "Accept a `chat_template` in requests. Off by "
         "default: a template is a program, and a client's could make the server render for long "
         "(renderings are bounded: 5 s, range() of 100k, results of `*` of 1M items).",
         group="Chat", boolean=True),
    Flag("enable-auto-tool-choice", None, False, "Parse tool calls out of chat outputs (requests "
         "with `tools`; tool_choice auto) with --tool-call-parser.", group="Chat", boolean=True),
    Flag("tool-call-parser", str, None, "Format of the model's tool calls: hermes (Qwen2.5, Qwen3, "
         "Hermes), llama3_json (Llama 3.1/3.2 JSON), mistral, pythonic (Llama 3.2/4), qwen3_coder "
         "(Qwen3-Coder's XML).", group="Chat", choices=TOOL_CALL_PARSERS),
    Flag("reasoning-parser", str, None, "Split the model's <think>...</think> into the message's "
         "reasoning_content (streamed as delta.reasoning_content): qwen3 or deepseek_r1.",
         group="Chat", choices=REASONING_PARSERS),
    Flag("responses-store-size", int, 1000, "Responses API: the most responses kept in memory for "
         "GET /v1/responses/{id} and previous_response_id (the least recently used go first).",
         group="Chat"),
    Flag("responses-store-ttl", float, 3600.0, "Responses API: seconds a stored response is kept "
         "after its last use.", group="Chat"),
    Flag("disable-log-requests", None, False, "Do not log each request (nor uvicorn's access log).",
         group="Logging", boolean=True),
    Flag("disable-log-stats", None, False, "Do not log the periodic throughput / KV-cache line.",
         group="Logging", boolean=True),
    Flag("log-stats-interval", float, 10.0, "Seconds between two stats log lines.", group="Logging"),
    Flag("log-level", str.lower, "info", "pagoda's log level.", group="Logging", choices=LOG_LEVELS),
    Flag("uvicorn-log-level", str.lower, "info", "uvicorn's log level.", group="Logging",
         choices=LOG_LEVELS + ("trace",)),
]

# --help lists the groups in this order
GROUP_ORDER = ("Server", "Model", "KV cache", "Scheduler", "Parallel", "Multimodal", "Chat", "Logging")


class _Default:
    """A default argparse left in place: the flag was not on the command line."""

    def __init__(self, value: Any):
        self.value = value

    def __str__(self) -> str:
        return str(self.value)

    __repr__ = __str__


class HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default where it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default.value if isinstance(action.default, _Default) else action.default
        if action.option_strings and default not in (None, False, "", [], argparse.SUPPRESS):
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            text += f" [default: {shown}]".replace("%", "%%")
        return text


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model_tag", nargs="?", metavar="MODEL", default=None,
                        help="Model to serve (same as --model): a HF-format directory, a .gguf file "
                             "or a hub id. Default: the bundled SmolLM2-135M-Instruct.")
    groups = {name: parser.add_argument_group(name) for name in GROUP_ORDER}
    add_flags(parser, SERVER_FLAGS, groups)
    EngineArgs.add_cli_args(parser, groups)
    for action in parser._actions:  # noqa: SLF001 - argparse has no public list of actions
        if action.dest != "help" and action.default is not argparse.SUPPRESS:
            action.default = _Default(action.default)
    parser.set_defaults(_serve_parser=parser)
    return parser


def _convert(action: argparse.Action, key: str, value: Any) -> Any:
    """A config-file value, checked like the command line would check it."""
    if isinstance(value, str) and action.type is not None:
        try:
            value = action.type(value)
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise ValueError(f"--config: {key}: {e}")
    if action.choices and value not in action.choices:
        raise ValueError(f"--config: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _load_chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template: {value!r} is neither a file nor a Jinja template")


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Apply --config and the positional MODEL, unwrap defaults, and check the server flags."""
    parser: argparse.ArgumentParser = vars(args).pop("_serve_parser")
    actions = {a.dest: a for a in parser._actions}  # noqa: SLF001
    config_path = args.config.value if isinstance(args.config, _Default) else args.config
    if config_path:
        try:
            values = load_config_file(config_path)
        except OSError as e:
            raise ValueError(f"--config: cannot read {config_path}: {e.strerror or e}")
        unknown = sorted(k for k in values if k not in actions or k in ("help", "model_tag"))
        if unknown:
            raise ValueError(f"--config: unknown flag(s) in {config_path}: {', '.join(unknown)}")
        for key, value in values.items():
            if isinstance(getattr(args, key), _Default):
                setattr(args, key, _convert(actions[key], key, value))
    for key, value in vars(args).items():
        if isinstance(value, _Default):
            setattr(args, key, value.value)

    tag = args.__dict__.pop("model_tag", None)
    if tag is not None:
        if args.model is not None and args.model != tag:
            raise ValueError(f"--model: the model is given twice ({tag!r} and --model {args.model!r})")
        args.model = tag
    if not 0 < args.port < 65536:
        raise ValueError(f"--port: must be in 1..65535, got {args.port}")
    if args.api_server_count < 1:
        raise ValueError(f"--api-server-count: must be >= 1, got {args.api_server_count}")
    if args.api_server_count > 1 and args.engine_core == "thread":
        raise ValueError("--api-server-count: several API servers need --engine-core process (or auto)")
    if args.max_concurrent_requests is not None and args.max_concurrent_requests < 1:
        raise ValueError(f"--max-concurrent-requests: must be >= 1, got {args.max_concurrent_requests}")
    if args.max_request_body_size is None or args.max_request_body_size < 1:
        raise ValueError(f"--max-request-body-size: must be > 0, got {args.max_request_body_size}")
    if not args.request_body_timeout > 0:
        raise ValueError(f"--request-body-timeout: must be > 0, got {args.request_body_timeout}")
    for flag in ("max_connections", "max_stop_strings", "max_stop_string_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')}: must be >= 1, got {value}")
    if args.max_audio_file_size is None or args.max_audio_file_size < 1:
        raise ValueError(f"--max-audio-file-size: must be > 0, got {args.max_audio_file_size}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout: must be >= 0, got {args.shutdown_timeout}")
    if args.log_stats_interval <= 0:
        raise ValueError(f"--log-stats-interval: must be > 0, got {args.log_stats_interval}")
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise ValueError("--ssl-keyfile and --ssl-certfile must be given together")
    for flag in ("ssl_keyfile", "ssl_certfile"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise ValueError(f"--{flag.replace('_', '-')}: no such file: {path}")
    if args.api_key is not None and not args.api_key:
        raise ValueError("--api-key: must not be empty")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError(f"--enable-auto-tool-choice needs --tool-call-parser ({', '.join(TOOL_CALL_PARSERS)})")
    if args.responses_store_size < 0:
        raise ValueError(f"--responses-store-size: must be >= 0, got {args.responses_store_size}")
    if args.responses_store_ttl <= 0:
        raise ValueError(f"--responses-store-ttl: must be > 0 seconds, got {args.responses_store_ttl}")
    args.chat_template = _load_chat_template(args.chat_template)
    return args
