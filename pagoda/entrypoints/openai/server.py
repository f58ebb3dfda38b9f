"""The FastAPI app: routes, middlewares, error handlers and lifespan around one running engine.

``build_app(engine, args)`` takes an engine that is already running (AsyncLLM: the engine core
steps in its own process) and the parsed ``pagoda serve`` arguments; ``api_server`` runs it with
uvicorn.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Optional, Union

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagoda import __version__
from pagoda.metrics import CONTENT_TYPE, ServerMetrics, StatsLogger

from .errors import OpenAIError, error_response, from_exception, quote
from .frontend import FRONTEND_PATHS, PrefixSlashRedirect, add_frontend_routes
from .middleware import (OPEN_PATHS, AdmissionMiddleware, APIKeyMiddleware, BodySizeLimitMiddleware,
                         RequestContextMiddleware, ServerState)
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, ClassificationRequest,
                       ClassificationResponse, CompletionRequest, CompletionResponse,
                       DetokenizeRequest, DetokenizeResponse, EmbeddingRequest, EmbeddingResponse,
                       ErrorResponse, ModelCard, ModelList, PoolingRequest, PoolingResponse,
                       RerankRequest, RerankResponse, ResponseObject, ResponsesRequest, ScoreRequest,
                       ScoreResponse, ServerLoadResponse, TokenizeChatRequest,
                       TokenizeCompletionRequest, TokenizeResponse, VersionResponse)
from .responses_store import ResponseStore
from .serving_base import OpenAIServing, RequestLimits
from .serving_chat import ServingChat
from .serving_classification import ServingClassification
from .serving_completion import ServingCompletion
from .serving_embedding import ServingEmbedding
from .serving_models import ServingModels
from .serving_pooling import ServingPooling
from .serving_responses import ServingResponses
from .serving_score import ServingScore
from .serving_tokenize import ServingTokenize
from .serving_transcription import OPENAPI_FORM, ServingTranscription
from .streams import ClientDisconnected

logger = logging.getLogger("pagoda.server")

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}
_STREAM = {"text/event-stream": {"schema": {"type": "string"},
                                 "description": "with \"stream\": true: server-sent events, "
                                                "ending with `data: [DONE]`"}}
_EVENTS = {"text/event-stream": {"schema": {"type": "string"},
                                 "description": "with stream=true: typed server-sent events "
                                                "(`event: response.output_text.delta`, ...), each "
                                                "with a sequence_number"}}


def _is_model_tag(part) -> bool:
    """A Union of request models (/tokenize) names the member model: TokenizeChatRequest."""
    return isinstance(part, str) and part[:1].isupper()


def _is_union_tag(part) -> bool:
    """pydantic names the member of a Union in an error's location ("list[int]", "str", ...)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict")
                                      or "[" in part or _is_model_tag(part)
                                      or part.startswith(("function-", "constrained-")))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            return f"The request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    # A Union of models fails once per model: the model whose errors are not all missing fields
    # is the one the client meant ({"prompt": 5} is a bad prompt, not a chat without messages).
    members: dict = {}
    for err in errors:
        tag = next((x for x in err.get("loc", ()) if _is_model_tag(x)), None)
        members.setdefault(tag, []).append(err)
    if len(members) > 1:
        meant = [m for m in members.values() if any(e.get("type") != "missing" for e in m)]
        if len(meant) == 1:
            errors = meant[0]
    # A Union field fails once per member; the member that matched furthest (the deepest
    # location) says what is wrong, e.g. the one out-of-range id of a token-id prompt.
    best: dict = {}
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body" and not _is_union_tag(x)]
        key = loc[0] if loc else None
        # deeper first; at equal depth a wrong value beats a wrong type
        depth = (len(err.get("loc", ())), not str(err.get("type", "")).endswith("_type"))
        if key not in best or depth > best[key][0]:
            best[key] = (depth, ".".join(loc), err.get("msg"))
    chosen = list(best.values())
    parts = [f"{where or 'request body'}: {msg}" for _, where, msg in chosen[:3]]
    more = len(chosen) - 3
    param = chosen[0][1] or None if chosen else None
    return "; ".join(parts) + (f" (and {more} more errors)" if more > 0 else ""), param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError):
        return from_exception(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(message, 400, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = (f"Route {quote(request.method)} {quote(request.url.path)} not found."
                   if exc.status_code == 404 else str(exc.detail))
        return error_response(message, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, __: ClientDisconnected):
        return Response(status_code=499)  # nobody reads it; recorded in the HTTP metrics
    # Any other exception: a 500 from RequestContextMiddleware (see there why not a handler here).


def _add_routes(app: FastAPI, serving: OpenAIServing, metrics: ServerMetrics, state: ServerState,
                responses: ServingResponses, max_audio_bytes: int = 25 << 20) -> None:
    chat, completion = responses.chat, ServingCompletion(serving)
    models, tokenize = ServingModels(serving), ServingTokenize(serving)
    embedding = ServingEmbedding(serving)
    pooling, classification = ServingPooling(serving), ServingClassification(serving)
    scoring = ServingScore(serving)
    transcription = ServingTranscription(serving, max_audio_bytes)
    engine = serving.engine

    def require_generative(model: str | None) -> None:
        serving.check_model(model)
        if engine.model_config.is_pooling:
            raise OpenAIError(f"The model `{serving.model_name}` is a pooling model: it serves "
                              f"{', '.join(serving.pooling_routes())} only.", param="model",
                              code="unsupported")
        if engine.model_config.is_encoder_decoder:
            raise OpenAIError(f"The model `{serving.model_name}` is a speech model: it serves "
                              "/v1/audio/transcriptions and /v1/audio/translations only.",
                              param="model", code="unsupported")

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, tags=["OpenAI"],
              responses={200: {"content": _STREAM}, **_ERRORS})
    async def create_chat_completion(request: ChatCompletionRequest, raw: Request):
        require_generative(request.model)
        return await chat.create(request, raw)

    @app.post("/v1/completions", response_model=CompletionResponse, tags=["OpenAI"],
              responses={200: {"content": _STREAM}, **_ERRORS})
    async def create_completion(request: CompletionRequest, raw: Request):
        require_generative(request.model)
        return await completion.create(request, raw)

    @app.post("/v1/responses", response_model=ResponseObject, tags=["OpenAI"],
              responses={200: {"content": _EVENTS}, **_ERRORS})
    async def create_response(request: ResponsesRequest, raw: Request):
        require_generative(request.model)
        return await responses.create(request, raw)

    @app.get("/v1/responses/{response_id}", response_model=ResponseObject, tags=["OpenAI"],
             responses={200: {"content": _EVENTS}, **_ERRORS})
    async def retrieve_response(response_id: str, stream: bool = False,
                                starting_after: Optional[int] = None):
        return await responses.retrieve(response_id, stream, starting_after)

    @app.post("/v1/responses/{response_id}/cancel", response_model=ResponseObject, tags=["OpenAI"],
              responses=_ERRORS)
    async def cancel_response(response_id: str):
        return await responses.cancel(response_id)

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, tags=["OpenAI"], responses=_ERRORS)
    async def create_embedding(request: EmbeddingRequest, raw: Request):
        return await embedding.create(request, raw)

    @app.post("/pooling", response_model=PoolingResponse, tags=["Pooling"], responses=_ERRORS)
    async def create_pooling(request: PoolingRequest, raw: Request):
        return await pooling.create(request, raw)

    @app.post("/classify", response_model=ClassificationResponse, tags=["Pooling"], responses=_ERRORS)
    async def create_classify(request: ClassificationRequest, raw: Request):
        return await classification.create(request, raw)

    async def create_score(request: ScoreRequest, raw: Request):
        return await scoring.score(request, raw)

    async def do_rerank(request: RerankRequest, raw: Request):
        return await scoring.rerank(request, raw)

    for path in ("/score", "/v1/score"):
        app.add_api_route(path, create_score, methods=["POST"], response_model=ScoreResponse,
                          tags=["Pooling"], responses=_ERRORS, operation_id=f"score_{path.strip('/')}",
                          summary="Score text pairs")
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.add_api_route(path, do_rerank, methods=["POST"], response_model=RerankResponse,
                          tags=["Pooling"], responses=_ERRORS,
                          operation_id=f"rerank_{path.strip('/').replace('/', '_')}",
                          summary="Rerank documents by relevance to a query")

    audio_doc = dict(methods=["POST"], tags=["OpenAI"], response_class=Response, openapi_extra=OPENAPI_FORM,
                     responses={200: {"description": "json / verbose_json: a JSON object; text, srt, "
                                      "vtt: text; stream: server-sent events"}, **_ERRORS})

    async def create_transcription(raw: Request):
        return await transcription.create(raw, translate=False)

    async def create_translation(raw: Request):
        return await transcription.create(raw, translate=True)

    app.add_api_route("/v1/audio/transcriptions", create_transcription, summary="Transcribe audio",
                      **audio_doc)
    app.add_api_route("/v1/audio/translations", create_translation,
                      summary="Translate audio into English text", **audio_doc)

    # SageMaker: one route for every kind of request, told apart by the body's shape (vLLM's rule)
    invocation_routes = [
        ("messages", "/v1/chat/completions", ChatCompletionRequest, create_chat_completion),
        ("prompt", "/v1/completions", CompletionRequest, create_completion),
        ("query", "/rerank", RerankRequest, do_rerank),
        ("text_1", "/score", ScoreRequest, create_score),
        ("input", "/v1/embeddings", EmbeddingRequest, create_embedding),
        ("input", "/classify", ClassificationRequest, create_classify),
        ("input", "/pooling", PoolingRequest, create_pooling),
    ]

    @app.post("/invocations", tags=["SageMaker"], response_class=Response,
              responses={200: {"description": "The response of the endpoint the body was routed to."},
                         **_ERRORS})
    async def invocations(raw: Request, body: dict[str, Any] = Body(...)):
        served = serving.pooling_routes()
        for key, route, model_cls, handler in invocation_routes:
            if key not in body:
                continue
            if key == "input" and served and route not in served:
                continue  # the input-shaped endpoint this model serves comes later
            try:
                request = model_cls.model_validate(body)
            except ValidationError as e:
                raise RequestValidationError(e.errors()) from None
            return await handler(request, raw)
        keys = ", ".join(dict.fromkeys(k for k, *_ in invocation_routes))
        raise OpenAIError(f"/invocations: the body has none of the fields that select an endpoint "
                          f"({keys}).", param=None)

    @app.get("/v1/models", response_model=ModelList, tags=["OpenAI"], responses=_ERRORS)
    async def list_models():
        return models.list()

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, tags=["OpenAI"], responses=_ERRORS)
    async def retrieve_model(model_id: str):
        return models.get(model_id)

    @app.post("/tokenize", response_model=TokenizeResponse, tags=["Tokens"], responses=_ERRORS)
    async def tokenize_prompt(request: Union[TokenizeCompletionRequest, TokenizeChatRequest] = Body()):
        return await tokenize.tokenize(request)

    @app.post("/detokenize", response_model=DetokenizeResponse, tags=["Tokens"], responses=_ERRORS)
    async def detokenize_tokens(request: DetokenizeRequest):
        return await tokenize.detokenize(request)

    async def health() -> Response:
        if state.draining:
            return error_response("The server is shutting down.", 503, code="shutting_down")
        if not engine.is_healthy():
            return error_response("The engine is not running.", 503, code="engine_dead")
        return Response(status_code=200)

    health_doc = dict(tags=["Operations"], response_class=Response,
                      responses={200: {"description": "Ready (empty body)."}, 503: {"model": ErrorResponse}})
    # HEAD too: load balancers probe with it
    app.add_api_route("/health", health, methods=["GET", "HEAD"], summary="Health (200 when ready)",
                      **health_doc)
    app.add_api_route("/ping", health, methods=["GET", "HEAD", "POST"], summary="Ping (same as /health)",
                      **health_doc)

    @app.get("/load", response_model=ServerLoadResponse, tags=["Operations"])
    async def server_load():
        """Requests in flight on the model endpoints, with --enable-server-load-tracking (else 0)."""
        return ServerLoadResponse(server_load=state.active_generations if state.track_load else 0)

    @app.get("/version", response_model=VersionResponse, tags=["Operations"])
    async def version():
        return VersionResponse(version=__version__)

    @app.get("/metrics", tags=["Operations"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}})
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)


def build_app(engine: Any, args: Any) -> FastAPI:
    """The app for one loaded engine; ``args`` is the resolved ``pagoda serve`` namespace."""
    state = ServerState(track_load=bool(getattr(args, "enable_server_load_tracking", False)))
    served = engine.model_config.served_model_names
    metrics = ServerMetrics(engine, served[0], engine.model_config.max_model_len)
    engine.add_step_listener(metrics.on_engine_step)
    serving = OpenAIServing(engine, metrics, chat_template=args.chat_template,
                            log_requests=not args.disable_log_requests,
                            limits=RequestLimits(args.max_stop_strings, args.max_stop_string_length),
                            trust_request_chat_template=getattr(args, "trust_request_chat_template",
                                                                False),
                            tool_call_parser=(getattr(args, "tool_call_parser", None)
                                              if getattr(args, "enable_auto_tool_choice", False)
                                              else None),
                            reasoning_parser=getattr(args, "reasoning_parser", None))
    responses = ServingResponses(serving, ServingChat(serving),
                                 ResponseStore(getattr(args, "responses_store_size", 1000),
                                               getattr(args, "responses_store_ttl", 3600.0)))

    loop: asyncio.AbstractEventLoop | None = None

    def start_draining() -> None:
        """Called from the signal handler: new requests get 503 from now on; streams still
        running after --shutdown-timeout are ended (finish_reason "abort", [DONE])."""
        def begin() -> None:
            if not state.draining:
                state.draining = True
                loop.call_later(args.shutdown_timeout, serving.end_all)
        if loop is not None:
            loop.call_soon_threadsafe(begin)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        nonlocal loop
        loop = asyncio.get_running_loop()
        stats_task = None
        if not args.disable_log_stats:
            stats_task = asyncio.create_task(_log_stats(StatsLogger(engine), args.log_stats_interval))
        try:
            yield
        finally:
            state.draining = True
            if stats_task:
                stats_task.cancel()
            await engine.shutdown(drain_timeout_s=args.shutdown_timeout)
            responses.close()
            serving.close()

    docs = not args.disable_fastapi_docs
    # redirect_slashes off: "/v1/completions/" is a 404, not a 307 to a URL built from the Host header
    app = FastAPI(title="pagoda", version=__version__, lifespan=lifespan, root_path=args.root_path or "",
                  description="OpenAI-compatible API served by pagoda.",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None, redirect_slashes=False)
    app.state.server = state
    app.state.start_draining = start_draining
    app.state.serving = serving
    app.state.metrics = metrics
    _install_error_handlers(app)
    max_audio = getattr(args, "max_audio_file_size", 25 << 20)
    _add_routes(app, serving, metrics, state, responses, max_audio)
    frontend = not args.disable_frontend
    if frontend:
        add_frontend_routes(app)

    # add_middleware wraps: the last one added runs first
    app.add_middleware(AdmissionMiddleware, state=state, limit=args.max_concurrent_requests)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=args.max_request_body_size,
                       max_audio_bytes=max_audio, timeout_s=args.request_body_timeout)
    if args.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=args.api_key,
                           open_paths=OPEN_PATHS | FRONTEND_PATHS if frontend else OPEN_PATHS)
    if args.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in args.allowed_origins,
                           expose_headers=["X-Request-Id"])
    app.add_middleware(RequestContextMiddleware, metrics=metrics, routes=app.router.routes)
    if frontend and args.root_path:
        app.add_middleware(PrefixSlashRedirect, root_path=args.root_path)
    return app


async def _log_stats(stats: StatsLogger, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            line = stats.line()
        except Exception:  # noqa: BLE001 - logging must never take the server down
            logger.exception("stats logging failed")
            continue
        if line:
            logger.info(line)
