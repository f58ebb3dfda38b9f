"""POST /v1/completions: one or many prompts (text or token ids), echo, legacy logprobs.

With several prompts each becomes its own engine request; choice ``index`` is
``prompt_index * n + sample_index`` as in OpenAI's API.
"""
from __future__ import annotations

import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from starlette.requests import Request
from starlette.responses import Response

from pagoda.outputs import CompletionOutput, RequestOutput

from .chunks import completion_choice, completion_chunk
from .errors import OpenAIError
from .logprobs import completion_logprobs
from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from .serving_base import OpenAIServing, check_count, random_id
from .serving_chat import usage_of
from .structured_outputs import from_request, validated
from .streams import SSE_DONE, SSEResponse, json_response, merge, sse_error


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what `echo` returns ("" unless echo)


def _join(a: Optional[CompletionLogprobs], b: CompletionLogprobs) -> CompletionLogprobs:
    if a is None:
        return b
    return CompletionLogprobs(text_offset=a.text_offset + b.text_offset,
                              token_logprobs=a.token_logprobs + b.token_logprobs,
                              tokens=a.tokens + b.tokens, top_logprobs=a.top_logprobs + b.top_logprobs)


class ServingCompletion:
    def __init__(self, serving: OpenAIServing):
        self.s = serving

    @staticmethod
    def _items(req: CompletionRequest) -> list:
        p = req.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise OpenAIError("prompt must not be empty.", param="prompt")
        if isinstance(p[0], int):
            return [p]
        check_count(len(p), "prompt", "prompts")
        return list(p)

    async def _prompts(self, req: CompletionRequest, items: list) -> list[Prompt]:
        prompts = []
        for item in items:
            if isinstance(item, str):
                ids = await self.s.encode(item, add_special_tokens=True)
                prompts.append(Prompt(ids, item if req.echo else ""))
            else:
                self.s.check_token_ids(item, "prompt")
                prompts.append(Prompt(list(item), await self.s.decode(item) if req.echo else ""))
        return prompts

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        s = self.s
        s.check_model(req.model)
        if req.suffix is not None:
            raise OpenAIError("suffix is not supported: pagoda does not do fill-in-the-middle "
                              "completions; remove the field.", param="suffix", code="unsupported")
        if req.best_of is not None and req.best_of != req.n:
            raise OpenAIError(f"best_of={req.best_of} is not supported; only best_of equal to n "
                              f"({req.n}) is.", param="best_of", code="unsupported")
        items = self._items(req)
        # each prompt runs n sequences: admitted as such, before any of them is tokenized
        s.admit(raw, len(items) * req.n, "prompt" if len(items) > 1 else "n")
        prompts = await self._prompts(req, items)
        want_prompt_lp = req.echo and req.logprobs is not None
        found = from_request(req)
        constraint = await validated(found)  # response_format / guided_*: 400 if bad
        params = [s.sampling_params(req, max_tokens=req.max_tokens, prompt_len=len(p.ids),
                                    logprobs=req.logprobs,
                                    prompt_logprobs=req.logprobs if want_prompt_lp else None,
                                    structured_outputs=constraint)
                  for p in prompts]
        request_id = random_id("cmpl")
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        started = await s.start_all(raw, [p.ids for p in prompts], params, ids,
                                    found.fields if found is not None else None)
        streams = [s.follow(first, gen, rid) for (first, gen), rid in zip(started, ids)]
        if req.stream:
            return SSEResponse(self._stream(req, request_id, prompts, streams))
        finals = await s.collect(raw, streams)
        choices = []
        for p, (prompt, final) in enumerate(zip(prompts, finals)):
            prompt_lp = self._prompt_logprobs(req, prompt, final)
            for o in final.outputs:
                choices.append(CompletionChoice(
                    index=p * req.n + o.index, text=prompt.text + o.text,
                    logprobs=self._logprobs(req, o.token_ids, o.logprobs, len(prompt.text), prompt_lp),
                    finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                    token_ids=list(o.token_ids) if req.return_token_ids else None,
                    prompt_token_ids=prompt.ids if req.return_token_ids else None))
        usage = usage_of(sum(len(p.ids) for p in prompts),
                         sum(len(o.token_ids) for f in finals for o in f.outputs),
                         sum(f.num_cached_tokens for f in finals))
        return json_response(CompletionResponse(id=request_id, model=s.model_name, choices=choices,
                                                usage=usage))

    def _prompt_logprobs(self, req: CompletionRequest, prompt: Prompt,
                         first: RequestOutput) -> Optional[CompletionLogprobs]:
        if not (req.echo and req.logprobs is not None):
            return None
        positions = first.prompt_logprobs or [None] * len(prompt.ids)
        return completion_logprobs(prompt.ids, positions, req.logprobs, self.s.token_text)

    def _logprobs(self, req: CompletionRequest, token_ids: list[int], positions, offset: int,
                  prefix: Optional[CompletionLogprobs]) -> Optional[CompletionLogprobs]:
        if req.logprobs is None:
            return None
        return _join(prefix, completion_logprobs(token_ids, positions or [], req.logprobs,
                                                 self.s.token_text, offset))

    async def _stream(self, req: CompletionRequest, request_id: str, prompts: list[Prompt],
                      streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[str | bytes]:
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = include_usage and bool(opts.continuous_usage_stats)
        created, model, n = int(time.time()), self.s.model_name, req.n
        total = len(prompts) * n
        generated, done, started = [0] * total, [False] * total, [False] * total
        offsets = [len(prompts[i // n].text) for i in range(total)]
        cached = [0] * len(prompts)
        prompt_tokens = sum(len(p.ids) for p in prompts)

        def usage_now():
            return usage_of(prompt_tokens, sum(generated), sum(cached))

        def choice(p: int, out: RequestOutput, o: CompletionOutput) -> Optional[dict]:
            idx = p * n + o.index
            if done[idx]:
                return None
            generated[idx] = len(o.token_ids)
            ids = out.delta_token_ids.get(o.index, [])
            text = out.delta_text.get(o.index, "")
            if not (text or ids or o.finish_reason):
                return None  # e.g. a step that only prefilled part of a long prompt
            prefix_lp, prefix = None, ""
            first_chunk = not started[idx]
            if first_chunk:  # echo: the prompt goes out with the first chunk of each choice
                started[idx] = True
                prefix = prompts[p].text
                prefix_lp = self._prompt_logprobs(req, prompts[p], out)
            if not (text or prefix or o.finish_reason or req.logprobs is not None
                    or (req.return_token_ids and ids)):
                return None
            logprobs = self._logprobs(req, ids, out.delta_logprobs.get(o.index), offsets[idx], prefix_lp)
            offsets[idx] += len(text)
            done[idx] = o.finish_reason is not None
            return completion_choice(idx, prefix + text, logprobs, o.finish_reason, o.stop_reason,
                                     list(ids) if req.return_token_ids else None,
                                     prompts[p].ids if req.return_token_ids and first_chunk else None)

        try:
            async with aclosing(merge(streams)) as merged:
                async for p, out in merged:
                    cached[p] = out.num_cached_tokens
                    choices = [c for o in out.outputs if (c := choice(p, out, o)) is not None]
                    if choices:
                        yield completion_chunk(request_id, created, model, choices,
                                               usage_now() if continuous else None)
            if include_usage:
                yield completion_chunk(request_id, created, model, [], usage_now())
        except Exception as e:  # noqa: BLE001 - the status line is gone; report in-stream
            yield sse_error(e, request_id)
        yield SSE_DONE
