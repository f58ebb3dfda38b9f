"""POST /v1/chat/completions: messages -> chat template -> token ids -> engine -> OpenAI shapes.

A request is first made a `ChatPlan` (prompt ids, sampling params with any structured-outputs
constraint, and how its text is read); each choice's text is then read by a `TurnReader`:
`--reasoning-parser` splits off the reasoning, then forced tool calls (tool_choice required /
named, generated through a grammar), the `--tool-call-parser` (tool_choice auto) or nothing
turn the rest into content and tool calls — whole, or delta by delta while streaming, the
deltas adding up to the whole. The Responses API (serving_responses.py) runs on the same plan.
"""
from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Optional, TypeVar, Union

from starlette.requests import Request
from starlette.responses import Response

from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams, StructuredOutputsParams

from .chunks import chat_chunk, chat_choice
from .errors import OpenAIError
from .logprobs import chat_logprobs
from .protocol import (ChatCompletionChoice, ChatCompletionRequest,
                       ChatCompletionResponse, ChatResponseMessage,
                       PromptTokensDetails, UsageInfo)
from .reasoning_parsers import ReasoningParser, Split
from .serving_base import OpenAIServing, prompt_length, random_id
from .streams import SSE_DONE, SSEResponse, json_response, sse_error, unless_disconnected
from .structured_outputs import Constraint, ForcedTools, forced_tools, from_request, validated
from .tool_parsers import ToolParser, tool_call

T = TypeVar("T")


def usage_of(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


async def _await(raw: Optional[Request], work: Awaitable[T]) -> T:
    """Await work, cancelled if the client goes away (no client: background responses)."""
    return await (unless_disconnected(raw, work) if raw is not None else work)


@dataclass
class ChatPlan:
    """One chat request made ready to run."""
    prompt_ids: Union[list[int], dict]  # token ids, or with images {"prompt_token_ids", "mm_features"}
    params: SamplingParams
    tools: Optional[list] = None
    tool_parser: Optional[ToolParser] = None   # tool_choice auto
    forced: Optional[ForcedTools] = None       # tool_choice required / named
    reasoning_parser: Optional[str] = None
    prompt_tail: str = ""                      # the prompt's last characters (does it open <think>?)
    fields: Optional[dict] = None              # the request fields of its structured-outputs constraint

    @property
    def num_prompt_tokens(self) -> int:
        return prompt_length(self.prompt_ids)

    def reader(self) -> "TurnReader":
        return TurnReader(self)


@dataclass
class Turn:
    """One choice read whole."""
    reasoning: Optional[str]
    content: Optional[str]
    tool_calls: list[dict[str, Any]]
    finish_reason: Optional[str]


@dataclass
class TurnDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: Optional[list[dict[str, Any]]] = None   # streamed tool-call deltas (with "index")
    finish_reason: Optional[str] = None


@dataclass
class TurnReader:
    """Reads one choice's text: `final` for the whole text, `feed` for streamed deltas."""
    plan: ChatPlan
    text: str = ""
    sent_reasoning: int = 0
    sent_content: int = 0
    call_id: str = field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex}")
    call_opened: bool = False

    def _split(self, text: str, final: bool) -> Split:
        if self.plan.reasoning_parser is None:
            return Split(None, text)
        return ReasoningParser(self.plan.reasoning_parser, self.plan.prompt_tail).split(text, final)

    def _forced_calls(self, content: str) -> Optional[list[dict[str, Any]]]:
        f = self.plan.forced
        if f.name is not None:  # the output is the arguments, exactly as generated
            return [tool_call(f.name, content, self.call_id)]
        calls = f.calls(content)
        return None if calls is None else [tool_call(n, a) for n, a in calls]

    @staticmethod
    def _finish(reason: Optional[str], calls, forced: Optional[ForcedTools]) -> Optional[str]:
        """OpenAI (and vLLM) report a turn that ended in tool calls as "tool_calls"; a named
        forced call keeps "stop"."""
        named = forced is not None and forced.name is not None
        return "tool_calls" if reason == "stop" and calls and not named else reason

    def final(self, text: str, finish_reason: Optional[str]) -> Turn:
        sp = self._split(text, True)
        content: Optional[str] = sp.content
        calls: list[dict[str, Any]] = []
        p = self.plan
        if p.forced is not None:
            calls = self._forced_calls(sp.content) or []
            content = None if calls else sp.content
        elif p.tool_parser is not None:
            parsed = p.tool_parser.parse(sp.content, p.tools)
            content, calls = parsed.content, parsed.tool_calls
        return Turn(sp.reasoning, content, calls, self._finish(finish_reason, calls, p.forced))

    def feed(self, delta: str, finish_reason: Optional[str]) -> TurnDelta:
        self.text += delta
        final = finish_reason is not None
        sp = self._split(self.text, final)
        out = TurnDelta(finish_reason=finish_reason)
        reasoning = sp.reasoning or ""
        out.reasoning, self.sent_reasoning = reasoning[self.sent_reasoning:], len(reasoning)
        content, sent = sp.content, self.sent_content
        p = self.plan
        if p.forced is not None and p.forced.name is not None:  # arguments stream as they come
            new = content[sent:]
            if new or (final and not self.call_opened):
                head = {"index": 0, "function": {"arguments": new}}
                if not self.call_opened:
                    self.call_opened = True
                    head = {"index": 0, "id": self.call_id, "type": "function",
                            "function": {"name": p.forced.name, "arguments": new}}
                out.tool_calls = [head]
            self.sent_content = len(content)
        elif p.forced is not None:  # required: the list is parsed once it is whole
            if final:
                calls = self._forced_calls(content)
                if calls:
                    out.tool_calls = [dict(c, index=k) for k, c in enumerate(calls)]
                else:
                    out.content = content[sent:]
                out.finish_reason = self._finish(finish_reason, calls, p.forced)
        elif p.tool_parser is not None:  # content up to a call's start; the calls at the end
            if not final:
                cut = max(p.tool_parser.stream_split(content), sent)
                out.content, self.sent_content = content[sent:cut], cut
            else:
                parsed = p.tool_parser.parse(content, p.tools)
                out.content = content[sent:]
                if parsed.tool_calls:
                    out.content = content[sent:parsed.first] + parsed.after
                    out.tool_calls = [dict(c, index=k) for k, c in enumerate(parsed.tool_calls)]
                out.finish_reason = self._finish(finish_reason, parsed.tool_calls, None)
        else:
            out.content, self.sent_content = content[sent:], len(content)
        return out


def _has_strict_tools(tools: Optional[list]) -> bool:
    return any(isinstance(t, dict) and isinstance(t.get("function"), dict) and t["function"].get("strict")
               for t in tools or [])


class ServingChat:
    def __init__(self, serving: OpenAIServing):
        self.s = serving

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        s = self.s
        plan = await self.plan(req, raw)
        request_id = random_id("chatcmpl")
        first, gen = await s.start(raw, plan.prompt_ids, plan.params, request_id, plan.fields)
        outputs = s.follow(first, gen, request_id)
        if req.stream:
            return SSEResponse(self._stream(req, plan, request_id, outputs))
        (final,) = await s.collect(raw, [outputs])
        return json_response(self._response(req, plan, request_id, final))

    async def plan(self, req: ChatCompletionRequest, raw: Optional[Request]) -> ChatPlan:
        """Check the request and make its prompt, params and readers (400s come from here)."""
        s = self.s
        s.check_model(req.model)
        if req.top_logprobs and not req.logprobs:
            raise OpenAIError("top_logprobs requires logprobs to be true.", param="top_logprobs")
        s.admit(raw, req.n, "n")
        forced = forced_tools(req.tools, req.tool_choice, req.parallel_tool_calls is not False)
        parser = self._tool_parser(req, forced)
        constraint = from_request(req)
        if forced is not None:
            if constraint is not None:
                raise OpenAIError("tool_choice 'required' or a named function cannot be combined with "
                                  "response_format / structured outputs.", param="tool_choice")
            constraint = forced.constraint
        elif constraint is None and parser is not None and _has_strict_tools(req.tools):
            tag = parser.structural_tag(req.tools)  # strict tools hold auto calls to their schemas
            if tag is not None:
                constraint = Constraint(StructuredOutputsParams(structural_tag=tag),
                                        {"structural_tag": "tools"})
        so = await validated(constraint)
        prompt = await _await(raw, s.chat_prompt(  # token ids, or with images a dict
            req.messages, req.add_generation_prompt, req.continue_final_message, req.chat_template,
            req.chat_template_kwargs, req.tools))
        n_prompt = prompt_length(prompt)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = s.sampling_params(req, max_tokens=max_tokens, prompt_len=n_prompt,
                                   logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                                   structured_outputs=so)
        reasoning = getattr(s, "reasoning_parser", None)
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt
        tail = await s.decode(ids[-8:]) if reasoning else ""
        return ChatPlan(prompt, params, req.tools, parser, forced, reasoning, tail,
                        constraint.fields if constraint is not None else None)

    def _tool_parser(self, req: ChatCompletionRequest, forced: Optional[ForcedTools]) -> Optional[ToolParser]:
        """The parser for tool_choice auto, or None (no tools, none, forced calls, or the server
        was started without --enable-auto-tool-choice)."""
        choice = req.tool_choice
        if choice not in (None, "auto", "none", "required") and not isinstance(choice, dict):
            raise OpenAIError(f"tool_choice must be 'none', 'auto', 'required' or a function, got "
                              f"{choice!r}.", param="tool_choice")
        if forced is not None:
            return None
        if choice == "auto" and self.s.tool_parser is None:
            raise OpenAIError('"auto" tool choice requires --enable-auto-tool-choice and '
                              '--tool-call-parser to be set on the server.', param="tool_choice")
        if not req.tools or choice == "none":
            return None
        return self.s.tool_parser

    def _response(self, req: ChatCompletionRequest, plan: ChatPlan, request_id: str,
                  final: RequestOutput) -> ChatCompletionResponse:
        top = req.top_logprobs or 0
        choices = []
        for o in final.outputs:
            turn = plan.reader().final(o.text, o.finish_reason)
            choices.append(ChatCompletionChoice(
                index=o.index, message=ChatResponseMessage(content=turn.content,
                                                           reasoning_content=turn.reasoning,
                                                           tool_calls=turn.tool_calls),
                logprobs=chat_logprobs(o.token_ids, o.logprobs or [], top, self.s.token_text)
                if req.logprobs else None,
                finish_reason=turn.finish_reason, stop_reason=o.stop_reason,
                token_ids=list(o.token_ids) if req.return_token_ids else None))
        generated = sum(len(o.token_ids) for o in final.outputs)
        return ChatCompletionResponse(id=request_id, model=self.s.model_name, choices=choices,
                                      usage=usage_of(len(final.prompt_token_ids), generated,
                                                     final.num_cached_tokens))

    async def _stream(self, req: ChatCompletionRequest, plan: ChatPlan, request_id: str,
                      outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str | bytes]:
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = include_usage and bool(opts.continuous_usage_stats)
        created, model, top = int(time.time()), self.s.model_name, req.top_logprobs or 0
        prompt_tokens = plan.num_prompt_tokens
        generated = [0] * req.n
        done = [False] * req.n
        readers = [plan.reader() for _ in range(req.n)]
        cached = 0

        def chunk(choices: list[dict], usage=None) -> bytes:
            return chat_chunk(request_id, created, model, choices, usage)

        def usage_now():
            return usage_of(prompt_tokens, sum(generated), cached)

        yield chunk([chat_choice(i, role="assistant", content="") for i in range(req.n)],
                    usage_now() if continuous else None)
        try:
            async with aclosing(outputs):
                async for out in outputs:
                    cached = out.num_cached_tokens
                    choices = []
                    for o in out.outputs:
                        i = o.index
                        if done[i]:
                            continue
                        generated[i] = len(o.token_ids)
                        ids = out.delta_token_ids.get(i, [])
                        d = readers[i].feed(out.delta_text.get(i, ""), o.finish_reason)
                        if not (d.content or d.reasoning or d.tool_calls) and d.finish_reason is None \
                                and not (ids and (req.logprobs or req.return_token_ids)):
                            continue
                        logprobs = (chat_logprobs(ids, out.delta_logprobs.get(i) or [], top,
                                                  self.s.token_text)
                                    if req.logprobs else None)
                        choices.append(chat_choice(
                            i, content=d.content if d.content or not d.reasoning else None,
                            reasoning_content=d.reasoning or None, tool_calls=d.tool_calls,
                            logprobs=logprobs, finish_reason=d.finish_reason, stop_reason=o.stop_reason,
                            token_ids=list(ids) if req.return_token_ids else None))
                        done[i] = d.finish_reason is not None
                    if choices:
                        yield chunk(choices, usage_now() if continuous else None)
            if include_usage:
                yield chunk([], usage_now())
        except Exception as e:  # noqa: BLE001 - the status line is gone; report in-stream
            yield sse_error(e, request_id)
        yield SSE_DONE
