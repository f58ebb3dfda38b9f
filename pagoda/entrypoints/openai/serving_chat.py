"""POST /v1/chat/completions: messages -> chat template -> token ids -> engine -> OpenAI shapes."""
from __future__ import annotations

import time
from contextlib import aclosing
from typing import AsyncIterator, Optional

from starlette.requests import Request
from starlette.responses import Response

from pagoda.outputs import RequestOutput

from .errors import OpenAIError
from .logprobs import chat_logprobs
from .protocol import (ChatCompletionChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatResponseMessage, ChatStreamChoice, DeltaMessage,
                       PromptTokensDetails, UsageInfo)
from .serving_base import OpenAIServing, random_id
from .tool_parsers import HermesToolParser, ParsedOutput
from .streams import SSE_DONE, SSEResponse, json_response, sse, sse_error, unless_disconnected


def usage_of(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def _finish(reason: Optional[str], parsed: ParsedOutput) -> Optional[str]:
    """OpenAI reports a turn that ended in tool calls as finish_reason "tool_calls"."""
    return "tool_calls" if reason == "stop" and parsed.tool_calls else reason


class ServingChat:
    def __init__(self, serving: OpenAIServing):
        self.s = serving

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        s = self.s
        s.check_model(req.model)
        if req.top_logprobs and not req.logprobs:
            raise OpenAIError("top_logprobs requires logprobs to be true.", param="top_logprobs")
        prompt_ids = await unless_disconnected(raw, s.chat_prompt_ids(
            req.messages, req.add_generation_prompt, req.continue_final_message, req.chat_template,
            req.chat_template_kwargs, req.tools))
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = s.sampling_params(req, max_tokens=max_tokens, prompt_len=len(prompt_ids),
                                   logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        parser = self._tool_parser(req)
        request_id = random_id("chatcmpl")
        first, gen = await s.start(raw, prompt_ids, params, request_id)
        outputs = s.follow(first, gen, request_id)
        if req.stream:
            return SSEResponse(self._stream(req, request_id, len(prompt_ids), outputs, parser))
        (final,) = await s.collect(raw, [outputs])
        return json_response(self._response(req, request_id, final, parser))

    def _tool_parser(self, req: ChatCompletionRequest) -> Optional[HermesToolParser]:
        """The parser for this request's output, or None (no tools, tool_choice none, or the
        server was started without --enable-auto-tool-choice)."""
        choice = req.tool_choice
        if isinstance(choice, dict) or choice == "required":
            raise OpenAIError("tool_choice 'required' or a named function needs guided decoding, "
                              "which pagoda does not do yet; use 'auto' or 'none'.", param="tool_choice")
        if choice not in (None, "auto", "none"):
            raise OpenAIError(f"tool_choice must be 'none', 'auto', 'required' or a function, got "
                              f"{choice!r}.", param="tool_choice")
        if choice == "auto" and self.s.tool_parser is None:
            raise OpenAIError('"auto" tool choice requires --enable-auto-tool-choice and '
                              '--tool-call-parser to be set on the server.', param="tool_choice")
        if not req.tools or choice == "none":
            return None
        return self.s.tool_parser

    def _response(self, req: ChatCompletionRequest, request_id: str, final: RequestOutput,
                  parser: Optional[HermesToolParser] = None) -> ChatCompletionResponse:
        top = req.top_logprobs or 0
        choices = []
        for o in final.outputs:
            parsed = parser.parse(o.text) if parser else ParsedOutput(o.text)
            choices.append(ChatCompletionChoice(
                index=o.index, message=ChatResponseMessage(content=parsed.content,
                                                           tool_calls=parsed.tool_calls),
                logprobs=chat_logprobs(o.token_ids, o.logprobs or [], top, self.s.token_text)
                if req.logprobs else None,
                finish_reason=_finish(o.finish_reason, parsed), stop_reason=o.stop_reason,
                token_ids=list(o.token_ids) if req.return_token_ids else None))
        generated = sum(len(o.token_ids) for o in final.outputs)
        return ChatCompletionResponse(id=request_id, model=self.s.model_name, choices=choices,
                                      usage=usage_of(len(final.prompt_token_ids), generated,
                                                     final.num_cached_tokens))

    async def _stream(self, req: ChatCompletionRequest, request_id: str, prompt_tokens: int,
                      outputs: AsyncIterator[RequestOutput],
                      parser: Optional[HermesToolParser] = None) -> AsyncIterator[str]:
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = include_usage and bool(opts.continuous_usage_stats)
        created, model, top = int(time.time()), self.s.model_name, req.top_logprobs or 0
        generated = [0] * req.n
        done = [False] * req.n
        cached = 0
        full, sent = [""] * req.n, [0] * req.n  # with a tool parser: text so far, and sent as content

        def chunk(choices, usage=None) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created, model=model,
                                           choices=choices, usage=usage))

        def usage_now():
            return usage_of(prompt_tokens, sum(generated), cached)

        yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                     for i in range(req.n)], usage_now() if continuous else None)
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
                        text = out.delta_text.get(i, "")
                        finish, calls = o.finish_reason, None
                        if parser is not None:  # content up to a <tool_call>, the calls at the end
                            full[i] += text
                            if finish is None:
                                cut = max(parser.stream_split(full[i]), sent[i])
                                text, sent[i] = full[i][sent[i]:cut], cut
                            else:
                                parsed = parser.parse(full[i])
                                text = full[i][sent[i]:]
                                if parsed.tool_calls:
                                    text = full[i][sent[i]:parsed.first] + parsed.after
                                    calls = [dict(c, index=k) for k, c in enumerate(parsed.tool_calls)]
                                finish = _finish(finish, parsed)
                        if not text and finish is None and not (ids and (req.logprobs or req.return_token_ids)):
                            continue
                        logprobs = (chat_logprobs(ids, out.delta_logprobs.get(i) or [], top,
                                                  self.s.token_text)
                                    if req.logprobs else None)
                        choices.append(ChatStreamChoice(
                            index=i, delta=DeltaMessage(content=text, tool_calls=calls),
                            logprobs=logprobs, finish_reason=finish, stop_reason=o.stop_reason,
                            token_ids=list(ids) if req.return_token_ids else None))
                        done[i] = finish is not None
                    if choices:
                        yield chunk(choices, usage_now() if continuous else None)
            if include_usage:
                yield chunk([], usage_now())
        except Exception as e:  # noqa: BLE001 - the status line is gone; report in-stream
            yield sse_error(e, request_id)
        yield SSE_DONE
