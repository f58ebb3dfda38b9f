"""The Responses API: POST /v1/responses, GET /v1/responses/{id}, POST /v1/responses/{id}/cancel.

A request becomes a chat request (instructions as the system message, the stored conversation
of `previous_response_id`, then the input items: messages, function_call and
function_call_output; `tools`, `tool_choice` and `text.format` as chat's tools, tool_choice and
response_format) and runs on chat's plan (serving_chat.py): the same prompt, constraints,
reasoning and tool-call parsing. Its output becomes typed items (reasoning, message,
function_call) and, streamed, typed events with a `sequence_number`:
response.created, response.in_progress, response.output_item.added,
response.reasoning_text.delta/done, response.content_part.added, response.output_text.delta/done,
response.content_part.done, response.function_call_arguments.delta/done,
response.output_item.done, then response.completed (or .incomplete / .failed).

`background: true` returns at once and runs in the server: GET polls it, GET with `stream=true`
replays its events from `starting_after` and follows it live, cancel stops it. Responses are
kept (`store`, default true) in the bounded in-memory store of responses_store.py.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Optional

from starlette.requests import Request
from starlette.responses import Response

from pagoda.outputs import RequestOutput

from .errors import OpenAIError
from .protocol import (ChatCompletionRequest, ChatMessage, ResponseErrorInfo, ResponseFunctionCall,
                       ResponseObject, ResponseOutputMessage, ResponseOutputText, ResponseReasoningItem,
                       ResponseReasoningText, ResponsesRequest, ResponseUsage)
from .responses_store import ResponseStore, StoredResponse
from .serving_base import OpenAIServing
from .serving_chat import ChatPlan, ServingChat, TurnDelta
from .streams import SSEResponse, json_response, unless_disconnected

logger = logging.getLogger("pagoda.server")

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text", "text")


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _not_found(response_id: str, param: Optional[str] = None) -> OpenAIError:
    return OpenAIError(f"Response with id '{response_id}' not found.", 404, param=param,
                       code="response_not_found")


# ------------------------------------------------------------------------------ input -> chat

def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise OpenAIError(f"{where}.content: must be a string or a list of text parts.", param=where)
    texts = []
    for k, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS or not isinstance(
                part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise OpenAIError(f"{where}.content[{k}]: content part {kind!r} is not supported; only "
                              "input_text / output_text parts are.", param=where)
        texts.append(part["text"])
    return "\n".join(texts)


def _arguments(text: str) -> Any:
    """A call's arguments for the chat template: the object when they are JSON, else the text."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text
    return value if isinstance(value, dict) else text


def input_messages(input_: Any) -> list[dict[str, Any]]:
    """The request's `input` as chat messages (400 naming input[i] for what cannot be one)."""
    if isinstance(input_, str):
        return [{"role": "user", "content": input_}]
    msgs: list[dict[str, Any]] = []
    for i, item in enumerate(input_):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise OpenAIError(f"{where}: an input item is an object.", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = _ROLES.get(item.get("role"))
            if role is None:
                raise OpenAIError(f"{where}.role: must be user, assistant, system or developer, got "
                                  f"{item.get('role')!r}.", param=where)
            msgs.append({"role": role, "content": _text_of(item.get("content"), where)})
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("call_id"), str):
                raise OpenAIError(f"{where}: a function_call item needs name and call_id.", param=where)
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": _arguments(item.get("arguments", "{}"))}}
            last = msgs[-1] if msgs else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise OpenAIError(f"{where}: a function_call_output item needs call_id.", param=where)
            output = item.get("output", "")
            msgs.append({"role": "tool", "tool_call_id": item["call_id"],
                         "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            continue  # earlier reasoning handed back: templates drop it from the history anyway
        else:
            raise OpenAIError(f"{where}: items of type {kind!r} are not supported (message, "
                              "function_call, function_call_output and reasoning are).", param=where)
    return msgs


def _chat_tools(tools: Optional[list]) -> Optional[list[dict]]:
    if not tools:
        return None
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("name"), str):
            raise OpenAIError(f"tools[{i}]: only function tools ({{\"type\": \"function\", \"name\": ...}}) "
                              "are supported.", param=f"tools[{i}]")
        out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters",
                                                                         "strict") if k in t}})
    return out


def _chat_tool_choice(choice: Any, has_tools: bool) -> Any:
    if not has_tools:
        return None
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise OpenAIError('tool_choice: a forced tool is {"type": "function", "name": ...}.',
                              param="tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


# chat request fields -> the Responses request fields users wrote
_PARAMS = (("response_format.json_schema.schema", "text.format.schema"), ("response_format", "text.format"),
           ("max_completion_tokens", "max_output_tokens"), ("messages", "input"))


def _responses_param(e: OpenAIError) -> OpenAIError:
    param = e.param or ""
    for chat, resp in _PARAMS:
        if param.startswith(chat):
            new = resp + param[len(chat):] if chat != "messages" else "input"
            return OpenAIError(e.message.replace(param, new, 1), e.status, new, e.code, e.headers)
    if param.startswith("tools.") and param.endswith(".function.parameters"):
        new = param.replace(".function.parameters", ".parameters")
        return OpenAIError(e.message.replace(param, new, 1), e.status, new, e.code, e.headers)
    return e


# --------------------------------------------------------------------------------- one response

class ResponseRun:
    """Turns one response's engine outputs into output items and stream events."""

    def __init__(self, serving: OpenAIServing, plan: ChatPlan, response: ResponseObject,
                 conversation: list[dict[str, Any]]):
        self.s = serving
        self.plan = plan
        self.response = response
        self.conversation = conversation
        self.reader = plan.reader()
        self.seq = 0
        self.reasoning: Optional[ResponseReasoningItem] = None
        self.message: Optional[ResponseOutputMessage] = None
        self.calls: dict[int, ResponseFunctionCall] = {}   # open function calls by index
        self.final: Optional[RequestOutput] = None

    def _event(self, type_: str, **fields) -> dict[str, Any]:
        e = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return e

    def _dump(self, model) -> dict[str, Any]:
        return model.model_dump(mode="json")

    def _index(self, item) -> int:
        return next(i for i, x in enumerate(self.response.output) if x is item)

    def _add(self, item) -> dict[str, Any]:
        self.response.output.append(item)
        return self._event("response.output_item.added", output_index=len(self.response.output) - 1,
                           item=self._dump(item))

    def _close_reasoning(self) -> list[dict]:
        r, self.reasoning = self.reasoning, None
        if r is None:
            return []
        r.status = "completed"
        i = self._index(r)
        return [self._event("response.reasoning_text.done", item_id=r.id, output_index=i, content_index=0,
                            text=r.content[0].text),
                self._event("response.output_item.done", output_index=i, item=self._dump(r))]

    def _close_message(self, status: str = "completed") -> list[dict]:
        m, self.message = self.message, None
        if m is None:
            return []
        m.status = status
        i, part = self._index(m), m.content[0]
        return [self._event("response.output_text.done", item_id=m.id, output_index=i, content_index=0,
                            text=part.text, logprobs=[]),
                self._event("response.content_part.done", item_id=m.id, output_index=i, content_index=0,
                            part=self._dump(part)),
                self._event("response.output_item.done", output_index=i, item=self._dump(m))]

    def _close_calls(self) -> list[dict]:
        out = []
        for c in self.calls.values():
            c.status = "completed"
            i = self._index(c)
            out += [self._event("response.function_call_arguments.done", item_id=c.id, output_index=i,
                                name=c.name, arguments=c.arguments),
                    self._event("response.output_item.done", output_index=i, item=self._dump(c))]
        self.calls = {}
        return out

    def _open_message(self) -> list[dict]:
        if self.message is not None:
            return []
        out = self._close_reasoning()
        m = ResponseOutputMessage(id=_item_id("msg"), status="in_progress")
        out.append(self._add(m))
        m.content = [ResponseOutputText(text="")]
        self.message = m
        out.append(self._event("response.content_part.added", item_id=m.id, output_index=self._index(m),
                               content_index=0, part=self._dump(ResponseOutputText(text=""))))
        return out

    def apply(self, d: TurnDelta) -> list[dict]:
        out: list[dict] = []
        if d.reasoning:
            if self.reasoning is None:
                r = ResponseReasoningItem(id=_item_id("rs"), status="in_progress")
                out.append(self._add(r))
                r.content = [ResponseReasoningText(text="")]
                self.reasoning = r
            self.reasoning.content[0].text += d.reasoning
            out.append(self._event("response.reasoning_text.delta", item_id=self.reasoning.id,
                                   output_index=self._index(self.reasoning), content_index=0, delta=d.reasoning))
        if d.content:
            out += self._open_message()
            self.message.content[0].text += d.content
            out.append(self._event("response.output_text.delta", item_id=self.message.id,
                                   output_index=self._index(self.message), content_index=0,
                                   delta=d.content, logprobs=[]))
        for tc in d.tool_calls or []:
            fn = tc.get("function", {})
            k = tc.get("index", 0)
            if k not in self.calls:
                out += self._close_reasoning() + self._close_message()
                c = ResponseFunctionCall(id=_item_id("fc"), call_id=f"call_{uuid.uuid4().hex[:24]}",
                                         name=fn.get("name", ""), arguments="", status="in_progress")
                out.append(self._add(c))
                self.calls[k] = c
            c = self.calls[k]
            delta = fn.get("arguments") or ""
            if delta:
                c.arguments += delta
                out.append(self._event("response.function_call_arguments.delta", item_id=c.id,
                                       output_index=self._index(c), delta=delta))
        return out

    async def _usage(self) -> ResponseUsage:
        f = self.final
        out_tokens = len(f.outputs[0].token_ids) if f is not None else 0
        reasoning = "".join(r.content[0].text for r in self.response.output
                            if isinstance(r, ResponseReasoningItem) and r.content)
        n_reason = len(await self.s.encode(reasoning, add_special_tokens=False)) if reasoning else 0
        n_in = self.plan.num_prompt_tokens
        u = ResponseUsage(input_tokens=n_in, output_tokens=out_tokens, total_tokens=n_in + out_tokens)
        u.input_tokens_details.cached_tokens = f.num_cached_tokens if f is not None else 0
        u.output_tokens_details.reasoning_tokens = min(n_reason, out_tokens)
        return u

    def history(self) -> list[dict[str, Any]]:
        """The conversation through this response: what previous_response_id continues from."""
        text = "".join(m.content[0].text for m in self.response.output
                       if isinstance(m, ResponseOutputMessage) and m.content)
        calls = [{"id": c.call_id, "type": "function",
                  "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                 for c in self.response.output if isinstance(c, ResponseFunctionCall)]
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            msg["tool_calls"] = calls
        return self.conversation + [msg]

    async def events(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[dict]:
        r = self.response
        yield self._event("response.created", response=self._dump(r))
        yield self._event("response.in_progress", response=self._dump(r))
        finish = None
        try:
            async with aclosing(outputs):
                async for out in outputs:
                    self.final = out
                    o = out.outputs[0]
                    for e in self.apply(self.reader.feed(out.delta_text.get(0, ""), o.finish_reason)):
                        yield e
                    finish = o.finish_reason
        except OpenAIError as e:  # the engine failed this request
            r.status, r.error = "failed", ResponseErrorInfo(code=e.code or "server_error", message=e.message)
        status = "incomplete" if finish == "length" else "completed"
        if not r.output and r.status != "failed":
            for e in self._open_message():
                yield e
        for e in self._close_reasoning() + self._close_message(status) + self._close_calls():
            yield e
        if r.status != "failed":
            r.status = status
            if status == "incomplete":
                r.incomplete_details = {"reason": "max_output_tokens"}
        r.usage = await self._usage()
        r.completed_at = int(time.time())
        yield self._event(f"response.{'failed' if r.status == 'failed' else r.status}", response=self._dump(r))


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


class ServingResponses:
    def __init__(self, serving: OpenAIServing, chat: ServingChat, store: ResponseStore):
        self.s = serving
        self.chat = chat
        self.store = store
        self._tasks: set[asyncio.Task] = set()

    async def create(self, req: ResponsesRequest, raw: Request) -> Response:
        s = self.s
        s.check_model(req.model)
        if req.background and not req.store:
            raise OpenAIError("background responses must be stored (store: true).", param="background")
        if req.background and self.store.max_size == 0:
            raise OpenAIError("background responses need the response store, which this server "
                              "turned off (--responses-store-size 0).", param="background")
        history: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            prev = self.store.get(req.previous_response_id)
            if prev is None:
                raise _not_found(req.previous_response_id, "previous_response_id")
            if not prev.finished:
                raise OpenAIError(f"previous_response_id: response {req.previous_response_id} is still "
                                  "in progress.", param="previous_response_id")
            history = prev.messages
        conversation = history + input_messages(req.input)
        if not conversation:
            raise OpenAIError("input: must not be empty.", param="input")
        system = [{"role": "system", "content": req.instructions}] if req.instructions else []
        plan = await self._plan(req, system + conversation, raw)
        rid = _item_id("resp")
        response = ResponseObject(
            id=rid, status="in_progress", model=s.model_name, instructions=req.instructions,
            previous_response_id=req.previous_response_id, max_output_tokens=req.max_output_tokens,
            temperature=req.temperature, top_p=req.top_p, parallel_tool_calls=req.parallel_tool_calls is not False,
            tool_choice=req.tool_choice if req.tool_choice is not None else "auto", tools=req.tools or [],
            text=req.text.model_dump(by_alias=True, exclude_none=True) if req.text else {"format": {"type": "text"}},
            reasoning=req.reasoning, store=req.store is not False, background=bool(req.background),
            metadata=req.metadata, user=req.user, truncation=req.truncation)
        run = ResponseRun(s, plan, response, conversation)
        first, gen = await s.start(raw, plan.prompt_ids, plan.params, rid, plan.fields)   # a bad prompt: 400 here
        outputs = s.follow(first, gen, rid)
        if req.background:
            stored = StoredResponse(response)
            self.store.put(stored)
            stored.task = asyncio.get_running_loop().create_task(self._background(run, stored, outputs))
            self._tasks.add(stored.task)
            stored.task.add_done_callback(self._tasks.discard)
            if req.stream:
                return SSEResponse(self._replay(stored, -1))
            return json_response(response)
        if req.stream:
            return SSEResponse(self._stream(run, outputs, req.store is not False))

        async def run_all() -> None:
            async for _ in run.events(outputs):
                pass
        await unless_disconnected(raw, run_all())
        if response.status == "failed":
            raise OpenAIError(response.error.message, 500, code=response.error.code)
        if req.store is not False:
            self.store.put(StoredResponse(response, run.history()))
        return json_response(response)

    async def _plan(self, req: ResponsesRequest, messages: list[dict], raw: Optional[Request]) -> ChatPlan:
        tools = _chat_tools(req.tools)
        fmt = req.text.format if req.text is not None else None
        response_format = None
        if fmt is not None and fmt.type != "text":
            response_format = {"type": fmt.type}
            if fmt.type == "json_schema":
                response_format["json_schema"] = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict}
        kwargs = None
        effort = (req.reasoning or {}).get("effort")
        if effort in ("none", "minimal"):
            kwargs = {"enable_thinking": False}
        try:
            chat_req = ChatCompletionRequest(
                model=req.model, messages=[ChatMessage(**m) for m in messages], tools=tools,
                tool_choice=_chat_tool_choice(req.tool_choice, bool(tools)),
                parallel_tool_calls=req.parallel_tool_calls, response_format=response_format,
                max_completion_tokens=req.max_output_tokens, temperature=req.temperature, top_p=req.top_p,
                user=req.user, chat_template_kwargs=kwargs)
            return await self.chat.plan(chat_req, raw)
        except OpenAIError as e:
            raise _responses_param(e) from e
        except ValueError as e:  # pydantic: the converted request is not a valid chat request
            raise OpenAIError(f"input: {e}", param="input") from e

    async def _stream(self, run: ResponseRun, outputs, store: bool) -> AsyncIterator[str]:
        async for e in run.events(outputs):
            yield _sse(e)
        if store:
            self.store.put(StoredResponse(run.response, run.history()))

    async def _background(self, run: ResponseRun, stored: StoredResponse, outputs) -> None:
        try:
            async for e in run.events(outputs):
                await stored.add_event(e)
            stored.messages = run.history()
        except asyncio.CancelledError:
            r = run.response
            r.status, r.completed_at = "cancelled", int(time.time())
            for item in r.output:
                if item.status == "in_progress":
                    item.status = "incomplete"
            async with stored.changed:
                stored.changed.notify_all()
            raise
        except Exception:  # noqa: BLE001 - reported in the stored response
            logger.exception("background response %s failed", run.response.id)
            r = run.response
            r.status = "failed"
            r.error = ResponseErrorInfo(code="server_error", message="the response failed in the server")
            async with stored.changed:
                stored.changed.notify_all()

    async def _replay(self, stored: StoredResponse, starting_after: int) -> AsyncIterator[str]:
        async for e in stored.events_after(starting_after):
            yield _sse(e)

    def _stored(self, response_id: str) -> StoredResponse:
        stored = self.store.get(response_id)
        if stored is None:
            raise _not_found(response_id)
        return stored

    async def retrieve(self, response_id: str, stream: bool, starting_after: Optional[int]) -> Response:
        stored = self._stored(response_id)
        if stream:
            if not stored.response.background:
                raise OpenAIError("stream: only background responses can be streamed again.", param="stream")
            return SSEResponse(self._replay(stored, -1 if starting_after is None else starting_after))
        return json_response(stored.response)

    async def cancel(self, response_id: str) -> Response:
        stored = self._stored(response_id)
        if not stored.response.background:
            raise OpenAIError("Only background responses can be cancelled.", param="response_id")
        task = stored.task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        return json_response(stored.response)

    def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
