"""Pure ASGI middlewares of the server (no BaseHTTPMiddleware: it buffers and breaks streaming).

Outermost first, as ``server.build_app`` stacks them:
  RequestContext  X-Request-Id in and out, HTTP metrics by route template, and the 500 for any
                  exception below it (well-formed JSON, the connection stays usable)
  (CORS)          Starlette's, when --allowed-origins is set
  APIKey          401 without the key, on every route but /health, /ping and the chat page's files
  BodySizeLimit   413 past --max-request-body-size (audio uploads: past --max-audio-file-size),
                  408 past --request-body-timeout
  Admission       429 past --max-concurrent-requests (counted in sequences), 503 while draining
"""
from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagoda.metrics import ServerMetrics

from .errors import OpenAIError, error_response, from_exception

logger = logging.getLogger("pagoda.server")

# model work: admission control (--max-concurrent-requests, draining) and the /load count
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/pooling",
                              "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank",
                              "/invocations", "/v1/responses", "/v1/audio/transcriptions",
                              "/v1/audio/translations"})
AUDIO_PATHS = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})
# an audio upload's body is its file plus the form's other fields and multipart framing
AUDIO_FORM_OVERHEAD = 1 << 20
# Requests that take an admission slot: the ones that make the engine or the tokenizer work.
ADMITTED_PATHS = GENERATION_PATHS | {"/tokenize", "/detokenize"}
OPEN_PATHS = frozenset({"/health", "/ping"})
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces: safe to echo
# Metric labels never hold client text: other methods and unmatched paths share one value.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER = "other"


@dataclass
class ServerState:
    """Mutable server-wide state, shared by the middlewares and the lifespan."""
    draining: bool = False
    active_sequences: int = 0  # of admitted requests in flight (a request runs prompts x n)
    active_generations: int = 0  # requests in flight on GENERATION_PATHS
    track_load: bool = False     # --enable-server-load-tracking: /load reports active_generations


class Admission:
    """One admitted request's share of --max-concurrent-requests, in sequences.

    The middleware admits a request as one sequence before its body is parsed; an endpoint that
    finds it runs more (a list of prompts, ``n``) asks for the total with ``need`` before any
    work starts. Found at ``scope["state"]["admission"]``; released when the response ends.
    """

    def __init__(self, state: ServerState, limit: Optional[int]):
        self.state = state
        self.limit = limit
        self.units = 1
        state.active_sequences += 1

    def need(self, total: int, param: str) -> None:
        extra = total - self.units
        if extra <= 0:
            return
        if self.limit is not None:
            if total > self.limit:
                raise OpenAIError(f"{param}: this request runs {total} sequences (prompts x n), but "
                                  f"the server runs at most {self.limit} at once "
                                  "(--max-concurrent-requests); split it.", param=param)
            if self.state.active_sequences + extra > self.limit:
                raise too_many(self.limit)
        self.state.active_sequences += extra
        self.units = total

    def release(self) -> None:
        self.state.active_sequences -= self.units
        self.units = 0


def too_many(limit: int) -> OpenAIError:
    return OpenAIError(f"Too many concurrent requests: the limit is {limit} sequences "
                       "(--max-concurrent-requests); retry later.", 429, code="too_many_requests",
                       headers={"Retry-After": "1"})


def route_path(scope: Scope) -> str:
    """The path the router matches: without --root-path when the proxy left it in."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("/", ""):
        return path[len(root):] or "/"
    return path


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: list):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _template(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is None:  # rejected before routing (401, 413, 429): match it ourselves
            for r in self.routes:
                match, _ = r.matches(scope)
                if match != Match.NONE:
                    route = r
                    break
        return getattr(route, "path", None) or OTHER

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("x-request-id")
        request_id = given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status, started = 500, False
        t0 = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                MutableHeaders(scope=message).append("X-Request-Id", request_id)
            await send(message)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # noqa: BLE001 - every failure below becomes a well-formed 500
            # Here rather than in an `Exception` handler: Starlette runs that one outside every
            # middleware (no X-Request-Id) and re-raises, and uvicorn then drops the connection.
            logger.error("unhandled error in %s %s (X-Request-Id %s)", scope["method"],
                         scope["path"], request_id, exc_info=exc)
            if not started:  # once the status line is out, the generators report in-stream
                await error_response(f"Internal server error ({type(exc).__name__}); quote "
                                     f"X-Request-Id {request_id} when reporting it.", 500)(
                    scope, receive, send_with_id)
        finally:
            method = scope["method"] if scope["method"] in _METHODS else OTHER
            self.metrics.observe_http(method, self._template(scope), status,
                                      time.perf_counter() - t0)


class APIKeyMiddleware:
    """``open_paths``: exact paths served without the key (no prefixes: nothing below them)."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: frozenset[str] = OPEN_PATHS):
        self.app = app
        self.expected = api_key.encode()
        self.open_paths = open_paths

    def _accepts(self, header: str) -> bool:
        scheme, _, key = header.strip().partition(" ")
        # RFC 7235: the scheme is case-insensitive ("bearer", "BEARER"); headers arrive as
        # latin-1, so this gives back the bytes the client sent
        return (scheme.lower() == "bearer"
                and secrets.compare_digest(key.strip().encode("latin-1"), self.expected))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and route_path(scope) not in self.open_paths:
            given = Headers(scope=scope).get("authorization", "")
            if not self._accepts(given):
                msg = ("Missing API key: send 'Authorization: Bearer <key>'." if not given
                       else "Invalid API key.")
                return await error_response(msg, 401, code="invalid_api_key",
                                            headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Reads the whole body up front (requests are small JSON) and replays it to the app.

    An oversized body is still read, up to ``drain_limit``, before the 413 goes out, so that
    the client sees the 413 instead of a connection reset in the middle of its upload. The whole
    body must arrive within ``timeout_s`` (uvicorn has no such timeout): a Content-Length larger
    than what is sent, or a chunked body without its last chunk, gets a 408 and the connection
    is closed instead of being held forever.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, drain_limit: int = 64 << 20,
                 max_audio_bytes: int = 25 << 20, timeout_s: Optional[float] = None):
        self.app = app
        self.max_bytes = max_bytes
        self.max_audio_bytes = max_audio_bytes
        self.timeout_s = timeout_s
        self.drain_limit = max(drain_limit, max_bytes, max_audio_bytes + AUDIO_FORM_OVERHEAD)

    def _timed_out(self) -> ASGIApp:
        return error_response(f"The request body did not arrive within {self.timeout_s:g} s "
                              "(--request-body-timeout).", 408, code="request_timeout",
                              headers={"Connection": "close"})

    def _too_large(self, audio: bool) -> ASGIApp:
        if audio:
            return error_response(f"The audio file is too large: the limit is {self.max_audio_bytes} "
                                  "bytes (--max-audio-file-size).", 413, param="file",
                                  code="request_too_large")
        return error_response(f"Request body too large: the limit is {self.max_bytes} bytes "
                              "(--max-request-body-size).", 413, code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        audio = route_path(scope) in AUDIO_PATHS
        limit = self.max_audio_bytes + AUDIO_FORM_OVERHEAD if audio else self.max_bytes
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.drain_limit:
            return await self._too_large(audio)(scope, receive, send)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body = message.get("body", b"")
                    size += len(body)
                    if size <= limit:
                        chunks.append(body)
                    elif size > self.drain_limit:
                        break
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return await self._timed_out()(scope, receive, send)
        if size > limit:
            return await self._too_large(audio)(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for http.disconnect
        await self.app(scope, replay, send)


class AdmissionMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState, limit: Optional[int]):
        self.app = app
        self.state = state
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or route_path(scope) not in ADMITTED_PATHS:
            return await self.app(scope, receive, send)
        st = self.state
        if st.draining:
            return await error_response("The server is shutting down; retry on another replica.", 503,
                                        code="shutting_down", headers={"Retry-After": "5"})(scope, receive, send)
        if self.limit is not None and st.active_sequences >= self.limit:
            return await from_exception(too_many(self.limit))(scope, receive, send)
        admission = Admission(st, self.limit)
        scope.setdefault("state", {})["admission"] = admission
        generation = route_path(scope) in GENERATION_PATHS
        st.active_generations += generation
        try:
            await self.app(scope, receive, send)
        finally:
            admission.release()
            st.active_generations -= generation
