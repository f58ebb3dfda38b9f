"""The streamed chunks built as dicts (chunks.py) serialize to exactly the JSON of the pydantic
models in protocol.py — same keys, same order, same values — over the cases a stream produces."""
from __future__ import annotations

import json

import pytest

from pagoda.entrypoints.openai import chunks
from pagoda.entrypoints.openai.protocol import (ChatCompletionChunk, ChatLogprobs, ChatLogprobToken,
                                                ChatStreamChoice, CompletionChoice, CompletionLogprobs,
                                                CompletionResponse, DeltaMessage, PromptTokensDetails,
                                                TopLogprob, UsageInfo)


def _pairs(s: str | bytes):
    """JSON parsed keeping key order (lists of pairs), so order differences fail too."""
    return json.loads(s, object_pairs_hook=lambda kv: kv)


def _event(b: bytes) -> str:
    assert b.startswith(b"data: ") and b.endswith(b"\n\n")
    return b[6:-2].decode()


CLP = CompletionLogprobs(text_offset=[0, 3], token_logprobs=[-0.25, -1.5e-06], tokens=["a", "bc"],
                         top_logprobs=[{"a": -0.25, "b": -2.0}, None])
USAGE = [None, UsageInfo(prompt_tokens=3, completion_tokens=2, total_tokens=5),
         UsageInfo(prompt_tokens=9, completion_tokens=1, total_tokens=10,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=8))]


@pytest.mark.parametrize("usage", USAGE)
@pytest.mark.parametrize("kw", [
    dict(index=0, text=" hi", logprobs=None, finish_reason=None, stop_reason=None, token_ids=None,
         prompt_token_ids=None),
    dict(index=3, text="", logprobs=CLP, finish_reason="stop", stop_reason="\n", token_ids=[5, 6],
         prompt_token_ids=[1, 2, 3]),
    dict(index=1, text='q"\\\u00e9\U0001f600\n', logprobs=None, finish_reason="length", stop_reason=7,
         token_ids=[], prompt_token_ids=None),
])
def test_completion_chunk_matches_pydantic(kw, usage):
    ref = CompletionResponse(id="cmpl-1", created=17, model="m/x", usage=usage,
                             choices=[CompletionChoice(**kw)]).model_dump_json()
    fast = chunks.completion_chunk("cmpl-1", 17, "m/x", [chunks.completion_choice(**kw)], usage)
    assert _pairs(_event(fast)) == _pairs(ref)
    empty = chunks.completion_chunk("cmpl-1", 17, "m/x", [], usage)
    assert _pairs(_event(empty)) == _pairs(CompletionResponse(id="cmpl-1", created=17, model="m/x",
                                                              choices=[], usage=usage).model_dump_json())


CHAT_LP = ChatLogprobs(content=[ChatLogprobToken(token="x", logprob=-0.5, bytes=[120],
                                                 top_logprobs=[TopLogprob(token="x", logprob=-0.5, bytes=[120])])])


@pytest.mark.parametrize("usage", USAGE)
@pytest.mark.parametrize("delta,rest", [
    (dict(role="assistant", content=""), {}),
    (dict(content="Hello"), dict(token_ids=[9])),
    (dict(reasoning_content="think"), dict(logprobs=CHAT_LP)),
    (dict(tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                       "function": {"name": "f", "arguments": "{\"a\": 1}"}}]),
     dict(finish_reason="tool_calls")),
    (dict(), dict(finish_reason="stop", stop_reason="END")),
])
def test_chat_chunk_matches_pydantic(delta, rest, usage):
    ref = ChatCompletionChunk(id="chatcmpl-1", created=5, model="m", usage=usage,
                              choices=[ChatStreamChoice(index=2, delta=DeltaMessage(**delta), **rest)]
                              ).model_dump_json()
    fast = chunks.chat_chunk("chatcmpl-1", 5, "m", [chunks.chat_choice(2, **delta, **rest)], usage)
    assert _pairs(_event(fast)) == _pairs(ref)
