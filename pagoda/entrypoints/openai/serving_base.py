"""What every endpoint shares: model names, prompt rendering and tokenization, request ->
SamplingParams, starting an engine request, and following its outputs until it ends.

Prompts are tokenized here (not in the engine) so ``usage`` reports exactly the tokenizer's
counts, in a pool of tokenizer threads (pagoda.inputs.tokenizer_pool) so long prompts never
stall the event loop or each other; a prompt longer than any that could fit in max_model_len is
refused by its length before it is tokenized. Chat templates render in a pool of their own,
under a time budget (pagoda.inputs.chat_template), so one slow template never holds up another
request's tokenizing or rendering.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator, Callable, Optional, TypeVar

from starlette.requests import Request

from pagoda.engine.async_llm import EngineDeadError, RequestFailedError
from pagoda.engine.detokenizer import StopStringMatcher, stop_matcher
from pagoda.inputs.chat_template import Budget, image_urls, render_chat
from pagoda.inputs.tokenizer_pool import TokenizerPool, longest_token_chars
from pagoda.metrics import RequestTracker, ServerMetrics
from pagoda.outputs import PoolingRequestOutput, RequestOutput
from pagoda.pooling_params import PoolingParams
from pagoda.sampling_params import SamplingParams, StructuredOutputsParams

from .errors import OpenAIError, model_not_found
from .logprobs import TokenText
from .middleware import Admission
from .protocol import LOGIT_BIAS_RANGE, MAX_PROMPTS, ChatMessage, SamplingFields
from .reasoning_parsers import get_reasoning_parser
from .streams import unless_disconnected
from .tool_parsers import get_tool_parser

logger = logging.getLogger("pagoda.server")

T = TypeVar("T")

# chat_template_kwargs may not override what the request sets through its own fields
_RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "conversation", "add_generation_prompt",
                                       "continue_final_message", "chat_template", "tokenize",
                                       "return_dict", "tools", "documents", "multimodal"})


def bad_request(e: ValueError, fields: Optional[dict[str, str]] = None) -> OpenAIError:
    """Engine and SamplingParams messages start with the field they are about
    ("max_tokens: ...", "temperature must be ..."): report it as the error's param. `fields`
    renames a structured-outputs field ("json: ...", a grammar that compiled too long in the
    engine) to the request field it came from (`structured_outputs.Constraint.fields`)."""
    message = str(e)
    m = re.match(r"([a-z_][a-z0-9_]*)(:| must| is)", message)
    param = m.group(1) if m else None
    if fields and param in fields:
        message, param = fields[param] + message[len(param):], fields[param]
    return OpenAIError(message, param=param)


@dataclass
class RequestLimits:
    """What one request may ask for (server flags); stop strings cost the engine per token."""
    max_stop_strings: int = 64
    max_stop_string_length: int = 1024


# A prompt of more characters than max_model_len x (the longest token's characters) x this
# cannot fit; the margin covers tokenizers that drop characters (BERT drops whitespace).
PROMPT_CHARS_MARGIN = 4


def _build_stop_matcher(_tokenizer, stops: tuple[str, ...]) -> StopStringMatcher:
    return stop_matcher(stops)  # found by the detokenizers while the caller holds it


def check_count(count: int, param: str, what: str) -> None:
    if count > MAX_PROMPTS:
        raise OpenAIError(f"{param}: {count} {what}, but at most {MAX_PROMPTS} are allowed in one "
                          "request (as OpenAI's API).", param=param)


def engine_error(e: BaseException) -> OpenAIError:
    """An engine failure as the client sees it: a 500 (or the stream's last SSE event)."""
    if isinstance(e, EngineDeadError):
        return OpenAIError(f"The engine stopped ({e}); the server is restarting.", 500, code="engine_dead")
    return OpenAIError(str(e), 500, code="request_failed")


def prompt_length(prompt) -> int:
    """Tokens of a prompt given as token ids or as a prompt dict."""
    return len(prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _message_dict(m: ChatMessage, index: int, multimodal: bool = False) -> dict:
    """A request message as chat templates expect it: text parts joined into one string, or
    for a vision-language model the parts kept (text and image_url)."""
    content = m.content
    if isinstance(content, list):
        texts, parts = [], []
        for j, part in enumerate(content):
            if part.type == "image_url" and part.image_url is not None:
                if not multimodal:
                    raise OpenAIError(f"messages[{index}].content[{j}]: image_url parts need a "
                                      "vision-language model; this model is text-only",
                                      param=f"messages.{index}.content.{j}")
                parts.append({"type": "image_url", "image_url": {"url": part.image_url.url}})
                continue
            if part.type != "text" or part.text is None:
                kinds = "text and image_url parts are" if multimodal else \
                    "only text parts ({\"type\": \"text\", \"text\": ...}) are"
                raise OpenAIError(f"messages[{index}].content: content part type {part.type!r} is not "
                                  f"supported; {kinds}", param=f"messages.{index}.content")
            texts.append(part.text)
            parts.append({"type": "text", "text": part.text})
        content = parts if multimodal else "\n".join(texts)
    d: dict[str, Any] = {"role": m.role, "content": content if content is not None else ""}
    for key in ("name", "tool_call_id", "tool_calls"):
        if getattr(m, key) is not None:
            d[key] = getattr(m, key)
    return d


class OpenAIServing:
    def __init__(self, engine: Any, metrics: ServerMetrics, chat_template: Optional[str] = None,
                 log_requests: bool = True, tool_call_parser: Optional[str] = None,
                 trust_request_chat_template: bool = False, reasoning_parser: Optional[str] = None,
                 limits: Optional[RequestLimits] = None):
        self.engine = engine
        self.limits = limits or RequestLimits()
        self.trust_request_chat_template = trust_request_chat_template
        # set by --enable-auto-tool-choice --tool-call-parser NAME
        self.tool_parser = get_tool_parser(tool_call_parser) if tool_call_parser else None
        # --reasoning-parser NAME: <think> ... </think> -> reasoning_content
        self.reasoning_parser = get_reasoning_parser(reasoning_parser) if reasoning_parser else None
        self.tokenizer = engine.tokenizer
        mc = engine.model_config
        self.served_model_names: list[str] = list(mc.served_model_names)
        self.model_name = self.served_model_names[0]
        self.max_model_len: int = mc.max_model_len
        self.vocab_size: int = mc.vocab_size
        self.metrics = metrics
        self.chat_template = chat_template
        self.log_requests = log_requests
        self.vocab_limit = len(self.tokenizer) if self.tokenizer is not None else self.vocab_size
        self.token_text = TokenText(self.tokenizer)
        self._pool = TokenizerPool(self.tokenizer) if self.tokenizer is not None else None
        self.max_prompt_chars = (self.max_model_len * longest_token_chars(self.tokenizer)
                                 * PROMPT_CHARS_MARGIN if self.tokenizer is not None else None)
        self._render_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pagoda-render")
        self._background: set[asyncio.Task] = set()
        self.multimodal = bool(getattr(mc, "is_multimodal", False))
        self.media = None  # images of chat requests (vision-language models)
        if self.multimodal:
            from .serving_media import ServingMedia
            self.media = ServingMedia(engine)
        self._live: set[str] = set()  # engine requests being followed
        self.closing = False  # set when the shutdown timeout is up: no new engine requests

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        self._render_pool.shutdown(wait=False, cancel_futures=True)
        if self.media is not None:
            self.media.close()

    def end_all(self) -> None:
        """Abort every engine request in flight (the shutdown timeout is up): each stream ends
        with finish_reason "abort" and ``[DONE]``, each plain response with what it has, instead
        of being cut mid-body when uvicorn gives up on it."""
        self.closing = True
        for rid in list(self._live):
            self.abort_soon(rid)

    # ------------------------------------------------------------------------------ checks
    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name not in self.served_model_names:
            raise model_not_found(name)

    def check_engine(self) -> None:
        if not self.engine.is_healthy():
            raise OpenAIError("The engine is not running; the server is restarting or broken.", 503,
                              code="engine_dead", headers={"Retry-After": "5"})
        if self.closing:
            raise OpenAIError("The server is shutting down; retry on another replica.", 503,
                              code="shutting_down", headers={"Retry-After": "5"})

    @staticmethod
    def admit(raw: Optional[Request], sequences: int, param: str) -> None:
        """Count a request that runs several sequences (prompts x n) toward
        --max-concurrent-requests: 429 when they do not fit now, 400 when they never would.
        `raw` None: a background response, no longer an HTTP request to count."""
        if raw is None:
            return
        admission: Optional[Admission] = raw.scope.get("state", {}).get("admission")
        if admission is not None:
            admission.need(sequences, param)

    # -------------------------------------------------------------------------- tokenizing
    async def off_loop(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(tokenizer, ...)`` on a tokenizer thread; ValueError-like failures become a 400."""
        try:
            return await self._pool.run(fn, *args, **kwargs)
        except ValueError as e:  # UnicodeError included
            raise bad_request(e) from e

    def check_prompt_chars(self, chars: int, param: str) -> None:
        """Refuse, before tokenizing it, text too long to fit in max_model_len in any case."""
        limit = self.max_prompt_chars
        if limit is not None and chars > limit:
            raise OpenAIError(f"{param}: {chars} characters cannot fit in max_model_len "
                              f"{self.max_model_len} tokens (this server tokenizes at most {limit} "
                              "characters of one prompt).", param=param)

    @staticmethod
    def _encode(tokenizer, text: str, add_special_tokens: bool, param: str) -> list[int]:
        try:
            return list(tokenizer(text, add_special_tokens=add_special_tokens).input_ids)
        except TypeError as e:  # what the Rust tokenizer raises on text it cannot take
            raise ValueError(f"{param}: the text cannot be tokenized ({e})") from None

    async def encode(self, text: str, add_special_tokens: bool = True,
                     param: str = "prompt") -> list[int]:
        if self.tokenizer is None:
            raise OpenAIError(f"{param}: text needs a tokenizer (started with "
                              "--skip-tokenizer-init); send token ids", param=param)
        self.check_prompt_chars(len(text), param)
        return await self.off_loop(self._encode, text, add_special_tokens, param)

    async def encode_pair(self, text_1: str, text_2: str, params: tuple[str, str]) -> dict:
        """A text pair as one cross-encoder prompt, tokenized on a tokenizer thread."""
        for text, param in zip((text_1, text_2), params):
            self.check_prompt_chars(len(text), param)
        encode_pair = self.engine.processor.encode_pair
        return await self.off_loop(lambda tok, a, b: encode_pair(a, b, tokenizer=tok), text_1, text_2)

    async def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return await self.off_loop(lambda tok, ids: tok.decode(ids), token_ids)

    async def token_strs(self, token_ids: list[int]) -> list[str]:
        if self.tokenizer is None:
            return [f"token_id:{t}" for t in token_ids]
        return await self.off_loop(lambda tok, ids: tok.convert_ids_to_tokens(ids), token_ids)

    def check_token_ids(self, ids: list[int], param: str) -> None:
        limit = self.vocab_limit
        for t in ids:
            if not 0 <= t < limit:
                raise OpenAIError(f"{param}: token id {t} is outside the vocabulary [0, {limit}).",
                                  param=param)

    async def chat_prompt_ids(self, messages: list[ChatMessage], add_generation_prompt: bool,
                              continue_final_message: bool, chat_template: Optional[str],
                              template_kwargs: Optional[dict], tools: Optional[list],
                              add_special_tokens: bool = False) -> list[int]:
        """The rendered conversation's token ids (image parts stay their placeholders)."""
        text, _ = await self._render_messages(messages, add_generation_prompt, continue_final_message,
                                              chat_template, template_kwargs, tools)
        return await self.encode(text, add_special_tokens, param="messages")

    async def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool,
                          continue_final_message: bool, chat_template: Optional[str],
                          template_kwargs: Optional[dict], tools: Optional[list]):
        """What the engine takes for a conversation: its token ids, or with images
        {"prompt_token_ids", "mm_features"} (images fetched and preprocessed off the loop)."""
        text, msgs = await self._render_messages(messages, add_generation_prompt, continue_final_message,
                                                 chat_template, template_kwargs, tools)
        urls = image_urls(msgs) if self.media is not None else []
        if not urls:
            return await self.encode(text, False, param="messages")
        return await self.media.prompt(text, urls, lambda t: self.encode(t, False, param="messages"))

    async def _render_messages(self, messages: list[ChatMessage], add_generation_prompt: bool,
                               continue_final_message: bool, chat_template: Optional[str],
                               template_kwargs: Optional[dict], tools: Optional[list]):
        if add_generation_prompt and continue_final_message:
            raise OpenAIError("continue_final_message and add_generation_prompt cannot both be true; "
                              "set add_generation_prompt to false to continue the last message.",
                              param="continue_final_message")
        kwargs = dict(template_kwargs or {})
        clash = sorted(_RESERVED_TEMPLATE_KWARGS & kwargs.keys())
        if clash:
            raise OpenAIError(f"chat_template_kwargs may not set {', '.join(clash)}; use the request "
                              "fields of the same name.", param="chat_template_kwargs")
        if chat_template is not None and not self.trust_request_chat_template:
            raise OpenAIError("chat_template: this server does not accept chat templates in requests "
                              "(the operator can allow them with --trust-request-chat-template).",
                              param="chat_template")
        msgs = [_message_dict(m, i, self.multimodal) for i, m in enumerate(messages)]
        self.check_prompt_chars(sum(len(m["content"]) if isinstance(m["content"], str) else
                                    sum(len(p.get("text") or "") for p in m["content"]) for m in msgs),
                                "messages")
        text = await self.render(msgs, add_generation_prompt=add_generation_prompt,
                                 continue_final_message=continue_final_message,
                                 chat_template=chat_template or self.chat_template, tools=tools,
                                 multimodal=self.multimodal, **kwargs)
        return text, msgs

    async def render(self, messages: list[dict], **kw) -> str:
        """Render a chat template in the render pool. If the awaiting request goes away (client
        disconnect cancels it), the rendering is told to stop at its next budget check."""
        budget = Budget()
        fut = asyncio.get_running_loop().run_in_executor(
            self._render_pool, partial(render_chat, self.tokenizer, messages, budget=budget, **kw))
        try:
            return await fut
        except asyncio.CancelledError:
            budget.cancel()
            raise
        except ValueError as e:
            raise bad_request(e) from e

    # -------------------------------------------------------------------------- sampling
    def check_stop(self, stop: Optional[list[str]], stop_ids: Optional[list[int]]) -> None:
        """Stop strings and ids are checked on every generated token: bound how many, how long."""
        lim = self.limits
        for name, items in (("stop", stop), ("stop_token_ids", stop_ids)):
            if items and len(items) > lim.max_stop_strings:
                raise OpenAIError(f"{name}: {len(items)} given, but at most {lim.max_stop_strings} "
                                  "are allowed (--max-stop-strings).", param=name)
        longest = max(map(len, stop), default=0) if stop else 0
        if longest > lim.max_stop_string_length:
            raise OpenAIError(f"stop: a stop string of {longest} characters, but at most "
                              f"{lim.max_stop_string_length} are allowed (--max-stop-string-length).",
                              param="stop")
        if stop_ids:
            self.check_token_ids(stop_ids, "stop_token_ids")

    def sampling_params(self, req: SamplingFields, *, max_tokens: Optional[int], prompt_len: int,
                        logprobs: Optional[int] = None, prompt_logprobs: Optional[int] = None,
                        structured_outputs: Optional[StructuredOutputsParams] = None) -> SamplingParams:
        if max_tokens is None:  # as much as the context allows; the engine names the lengths if none
            max_tokens = max(self.max_model_len - prompt_len, 1)
        bias = None
        if req.logit_bias:
            bias = {}
            for key, value in req.logit_bias.items():
                try:
                    tid = int(key)
                except ValueError:
                    raise OpenAIError(f"logit_bias: key {key!r} is not a token id.", param="logit_bias")
                if not 0 <= tid < self.vocab_size:
                    raise OpenAIError(f"logit_bias: token id {tid} is outside the vocabulary "
                                      f"[0, {self.vocab_size}).", param="logit_bias")
                if not -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:
                    raise OpenAIError(f"logit_bias: bias {value} for token {tid} must be in "
                                      f"[-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}].", param="logit_bias")
                bias[tid] = value

        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        stop_ids = sorted(set(req.stop_token_ids)) if req.stop_token_ids else None
        self.check_stop(stop, stop_ids)
        if req.allowed_token_ids:
            self.check_token_ids(req.allowed_token_ids, "allowed_token_ids")

        def given(value, default):
            return default if value is None else value
        try:
            return SamplingParams(
                n=req.n, temperature=given(req.temperature, 1.0), top_p=given(req.top_p, 1.0),
                top_k=given(req.top_k, 0), min_p=given(req.min_p, 0.0),
                presence_penalty=given(req.presence_penalty, 0.0),
                frequency_penalty=given(req.frequency_penalty, 0.0),
                repetition_penalty=given(req.repetition_penalty, 1.0), seed=req.seed,
                max_tokens=max_tokens, min_tokens=req.min_tokens, stop=stop,
                stop_token_ids=stop_ids,
                include_stop_str_in_output=req.include_stop_str_in_output, ignore_eos=req.ignore_eos,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs, logit_bias=bias,
                skip_special_tokens=req.skip_special_tokens,
                spaces_between_special_tokens=req.spaces_between_special_tokens,
                structured_outputs=structured_outputs, allowed_token_ids=req.allowed_token_ids,
                bad_words=req.bad_words)
        except ValueError as e:
            raise bad_request(e) from e

    # ---------------------------------------------------------------------------- running
    async def start(self, raw: Optional[Request], prompt_ids, params: SamplingParams,
                    request_id: str, fields: Optional[dict[str, str]] = None
                    ) -> tuple[RequestOutput, AsyncIterator[RequestOutput]]:
        """Submit a request and wait for its first output, so a bad prompt is still a 400 (the
        engine validates before its first yield) rather than an error inside a 200 stream.
        prompt_ids: token ids, or a prompt dict (images: chat_prompt's). `raw` None: no client to
        watch (a background response). `fields`: the request fields of its structured-outputs
        constraint, for an engine error about it."""
        self.check_engine()
        matcher = None  # held until the first output: the request's detokenizers have it then
        if params.stop and self._pool is not None:  # built here, not on the event loop
            matcher = await self.off_loop(_build_stop_matcher, tuple(params.stop))
        self._live.add(request_id)
        if self.log_requests:
            logger.info("request %s (X-Request-Id %s): %d prompt tokens%s, %s", request_id,
                        raw.scope.get("state", {}).get("request_id") if raw is not None else None,
                        prompt_length(prompt_ids),
                        f" ({len(prompt_ids['mm_features'])} images)"
                        if isinstance(prompt_ids, dict) and prompt_ids.get("mm_features")
                        else " (audio)" if isinstance(prompt_ids, dict) and "encoder_features" in prompt_ids
                        else "", params)
        gen = self.engine.generate(prompt_ids, params, request_id)
        first = None
        try:
            first = await (unless_disconnected(raw, gen.__anext__()) if raw is not None else gen.__anext__())
        except ValueError as e:
            raise bad_request(e, fields) from e
        except (EngineDeadError, RequestFailedError) as e:
            raise engine_error(e) from e
        except StopAsyncIteration:
            raise OpenAIError(f"request {request_id} ended without output", 500)
        except BaseException:
            self.abort_soon(request_id)
            raise
        finally:
            if first is None:
                self._live.discard(request_id)
        del matcher  # the request's detokenizers hold it from here
        return first, gen

    async def start_all(self, raw: Request, prompts: list[list[int]], params: list[SamplingParams],
                        request_ids: list[str], fields: Optional[dict[str, str]] = None
                        ) -> list[tuple[RequestOutput, AsyncIterator[RequestOutput]]]:
        started = await asyncio.gather(*(self.start(raw, p, sp, rid, fields) for p, sp, rid in
                                         zip(prompts, params, request_ids)), return_exceptions=True)
        errors = [s for s in started if isinstance(s, BaseException)]
        if errors:
            for s, rid in zip(started, request_ids):
                if not isinstance(s, BaseException):
                    self._live.discard(rid)
                    self.abort_soon(rid)
            raise errors[0]
        return started  # type: ignore[return-value]

    def abort_soon(self, request_id: str) -> None:
        """Abort without awaiting: callable from a cancelled task or a generator's finally."""
        task = asyncio.get_running_loop().create_task(self.engine.abort(request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def follow(self, first: RequestOutput, gen: AsyncIterator[RequestOutput],
                     request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield a request's outputs, feed the metrics, and abort it if the consumer stops early
        (client gone, error): its KV blocks are freed at once."""
        tracker: RequestTracker = self.metrics.track()
        t0 = time.monotonic()
        last, finished = first, False
        try:
            async with aclosing(gen):
                tracker.on_output(first)
                finished = first.finished
                yield first
                while not finished:
                    try:
                        last = await gen.__anext__()
                    except StopAsyncIteration:
                        break
                    except (EngineDeadError, RequestFailedError) as e:
                        finished = True  # the engine already forgot it: nothing to abort
                        tracker.finish(last, reason="error")
                        raise engine_error(e) from e
                    tracker.on_output(last)
                    finished = last.finished
                    yield last
        finally:
            self._live.discard(request_id)
            if not finished:
                tracker.finish(last, reason="abort")
                self.abort_soon(request_id)
            if self.log_requests:
                logger.info("request %s %s: %d generated tokens, %.2fs", request_id,
                            "finished (" + ",".join(str(o.finish_reason) for o in last.outputs) + ")"
                            if finished else "aborted",
                            sum(len(o.token_ids) for o in last.outputs), time.monotonic() - t0)

    async def collect(self, raw: Request, streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
        """Run streams to their final outputs; a client that disconnects aborts all of them."""
        async def last_of(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
            async with aclosing(stream):
                out = None
                async for out in stream:
                    pass
                return out

        async def all_of() -> list[RequestOutput]:
            try:  # a TaskGroup cancels (aborts) the other prompts when one fails
                async with asyncio.TaskGroup() as tg:
                    tasks = [tg.create_task(last_of(s)) for s in streams]
            except BaseExceptionGroup as group:
                raise group.exceptions[0] from None
            return [t.result() for t in tasks]
        return await unless_disconnected(raw, all_of())

    # ---------------------------------------------------------------------------- pooling
    def pooling_routes(self) -> list[str]:
        """The pooling endpoints this server's model answers (none for a generative model)."""
        mc = self.engine.model_config
        if mc.pooling_kind == "embed":
            return ["/v1/embeddings", "/pooling", "/score", "/rerank"]
        if mc.pooling_kind == "classify":
            return ["/classify", "/pooling"] + (["/score", "/rerank"] if mc.num_labels == 1 else [])
        return []

    def require_route(self, model: Optional[str], route: str) -> None:
        """404 for an unknown model; 400 (param "model") when this model does not serve `route`."""
        self.check_model(model)
        served = self.pooling_routes()
        if route in served:
            return
        if not served:
            why = (f"The model `{self.model_name}` is a generative model: it does not serve {route}. "
                   "Start `pagoda serve` with a pooling model (an embedding model, a classifier or "
                   "cross-encoder, or a decoder with --runner pooling).")
        else:
            kind = ("an embedding model" if self.engine.model_config.pooling_kind == "embed" else
                    "a classifier")
            why = (f"The model `{self.model_name}` is {kind}: it does not serve {route}; it serves "
                   f"{', '.join(served)}.")
            if route in ("/score", "/rerank"):
                why += " Scores need an embedding model or a cross-encoder with one label."
        raise OpenAIError(why, param="model", code="unsupported")

    async def text_inputs(self, raw: Request, items: Any, add_special_tokens: bool,
                          param: str = "input") -> list[dict]:
        """An OpenAI `input` (a string, strings, token ids or token-id lists) as prompts; each
        input is one engine request, admitted as such before any is tokenized."""
        if isinstance(items, str) or (items and isinstance(items[0], int)):
            items = [items]
        if not items:
            raise OpenAIError(f"{param} must not be empty.", param=param)
        check_count(len(items), param, "inputs")
        self.admit(raw, len(items), param)
        prompts = []
        for i, item in enumerate(items):
            if not item:
                raise OpenAIError(f"{param}: item {i} is empty; every input needs at least one "
                                  "character or token.", param=param)
            if isinstance(item, str):
                prompts.append({"prompt_token_ids": await self.encode(item, add_special_tokens, param)})
            else:
                self.check_token_ids(item, param)
                prompts.append({"prompt_token_ids": list(item)})
        return prompts

    def pooling_params(self, **kw) -> PoolingParams:
        try:
            return PoolingParams(**kw)
        except ValueError as e:
            raise bad_request(e) from e

    def check_pooling(self, prompts: list[dict], params: PoolingParams,
                      fields: str | list[str] = "input") -> None:
        """Every prompt is checked (after truncation) before any runs; a 400 names the field
        (`fields`: one for all prompts, or each prompt's own)."""
        proc = self.engine.processor
        if isinstance(fields, str):
            fields = [fields] * len(prompts)
        try:
            proc.pooling_params(params)
            for p, field in zip(prompts, fields):
                ids, _ = proc.truncate(p["prompt_token_ids"], None, params)
                proc.check_prompt(ids, pooling=True, field=field)
        except ValueError as e:
            raise bad_request(e) from e

    async def pool_inputs(self, raw: Request, items: Any, add_special_tokens: bool, params: PoolingParams,
                          prefix: str) -> tuple[str, list[PoolingRequestOutput], int]:
        """An `input` field run with `params`, everything checked first: (request id, outputs in
        order, prompt tokens read)."""
        prompts = await self.text_inputs(raw, items, add_special_tokens)
        self.check_pooling(prompts, params)
        request_id = random_id(prefix)
        outs = await self.pool(raw, prompts, params, request_id)
        return request_id, outs, sum(len(o.prompt_token_ids) for o in outs)

    async def _pool_one(self, request_id: str, prompt: dict, params: PoolingParams) -> PoolingRequestOutput:
        """One pooling request, with its metrics and request log like generation's."""
        tracker: RequestTracker = self.metrics.track()
        t0 = time.monotonic()
        out = None
        try:
            async for out in self.engine.encode(prompt, params, request_id):
                pass
        except BaseException:
            tracker.finish(out, reason="abort")
            if self.log_requests:
                logger.info("request %s aborted: %d prompt tokens, %.2fs", request_id,
                            len(prompt["prompt_token_ids"]), time.monotonic() - t0)
            raise
        tracker.finish(out)
        if self.log_requests:
            logger.info("request %s finished (%s): %d prompt tokens, %.2fs", request_id, params.task,
                        len(out.prompt_token_ids), time.monotonic() - t0)
        return out

    async def pool(self, raw: Request, prompts: list[dict], params: PoolingParams,
                   request_id: str) -> list[PoolingRequestOutput]:
        """Run every prompt as its own engine request (batched with everyone's); the outputs in
        order. One failing (or the client leaving) aborts the others."""
        self.check_engine()
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]

        async def all_of() -> list[PoolingRequestOutput]:
            try:  # a TaskGroup cancels (aborts) the other inputs when one fails
                async with asyncio.TaskGroup() as tg:
                    tasks = [tg.create_task(self._pool_one(rid, p, params)) for rid, p in zip(ids, prompts)]
            except BaseExceptionGroup as group:
                raise group.exceptions[0] from None
            return [t.result() for t in tasks]
        try:
            return await unless_disconnected(raw, all_of())
        except ValueError as e:
            raise bad_request(e) from e
        except (EngineDeadError, RequestFailedError) as e:
            raise engine_error(e) from e
