"""Tool calls: the hermes parser, the streamed form against the non-streamed one, and a live
server started with --enable-auto-tool-choice --tool-call-parser hermes."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest

from pagoda.entrypoints.openai.protocol import ChatCompletionRequest
from pagoda.entrypoints.openai.serving_chat import ChatPlan, ServingChat
from pagoda.entrypoints.openai.tool_parsers import HermesToolParser, get_tool_parser
from pagoda.outputs import CompletionOutput, RequestOutput
from server_utils import PagodaServer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

TWO_CALLS = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
             '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n'
             '</tool_call>')


def test_hermes_parses_calls_and_keeps_the_rest_as_content():
    p = HermesToolParser()
    out = p.parse(TWO_CALLS)
    assert out.content == "Let me check."
    assert [c["function"]["name"] for c in out.tool_calls] == ["get_weather", "get_weather"]
    assert [json.loads(c["function"]["arguments"]) for c in out.tool_calls] == [{"city": "Paris"},
                                                                               {"city": "Lyon"}]
    assert all(c["type"] == "function" and c["id"].startswith("chatcmpl-tool-") for c in out.tool_calls)
    assert len({c["id"] for c in out.tool_calls}) == 2

    assert p.parse("no calls here").tool_calls == []
    assert p.parse("no calls here").content == "no calls here"
    # a block that is not a call stays in the content; text after the calls is kept too
    mixed = p.parse('<tool_call>not json</tool_call><tool_call>{"name": "f", "parameters": {"a": 1}}'
                    '</tool_call> done')
    assert [c["function"]["name"] for c in mixed.tool_calls] == ["f"]
    assert json.loads(mixed.tool_calls[0]["function"]["arguments"]) == {"a": 1}
    assert mixed.content == "<tool_call>not json</tool_call> done"
    # an unterminated last block (max_tokens, stop string) still parses if its JSON is whole
    assert p.parse('<tool_call>{"name": "f", "arguments": "{}"}').tool_calls[0]["function"]["arguments"] == "{}"
    with pytest.raises(ValueError, match="--tool-call-parser"):
        get_tool_parser("nope")


def test_stream_split_holds_back_a_possible_tag():
    p = HermesToolParser()
    assert p.stream_split("Hello <tool") == len("Hello ")
    assert p.stream_split("Hello <") == len("Hello ")
    assert p.stream_split("a < b") == len("a < b")
    assert p.stream_split("x<tool_call>{") == 1


def _outputs(text: str, cuts: list[int], finish: str = "stop"):
    """The engine's streamed outputs for `text`, cut at these character offsets."""
    bounds = [0, *cuts, len(text)]
    for k in range(len(bounds) - 1):
        last = k == len(bounds) - 2
        piece = text[bounds[k]:bounds[k + 1]]
        yield RequestOutput("r", None, [1, 2], [CompletionOutput(0, text[:bounds[k + 1]], list(range(k + 1)),
                                                                 finish_reason=finish if last else None)],
                            finished=last, delta_text={0: piece}, delta_token_ids={0: [k]})


async def _agen(items):
    for x in items:
        yield x


@pytest.mark.parametrize("text", [TWO_CALLS, "plain answer with a < sign and <tool talk", ""])
def test_streamed_tool_calls_equal_the_non_streamed_response(text):
    chat = ServingChat(SimpleNamespace(model_name="m", tool_parser=HermesToolParser()))
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
                                stream=True)
    plan = ChatPlan([1, 2], None, req.tools, chat._tool_parser(req, None))
    cuts = [c for c in (3, 14, 15, 16, 20, 60, 61, 100) if c < len(text)]  # cuts inside the tags
    final = list(_outputs(text, cuts))[-1]
    whole = chat._response(req, plan, "id", final).choices[0]

    async def collect():
        return [e async for e in chat._stream(req, plan, "id", _agen(_outputs(text, cuts)))]
    events = asyncio.run(collect())
    assert events[-1].strip() == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    calls = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == [whole.finish_reason]
    if whole.message.tool_calls:
        assert whole.finish_reason == "tool_calls"
        assert [tc["index"] for tc in calls] == list(range(len(whole.message.tool_calls)))
        assert [tc["function"] for tc in calls] == [tc["function"] for tc in whole.message.tool_calls]
        assert content.strip() == whole.message.content
    else:
        assert calls == [] and content == text == whole.message.content


@pytest.mark.slow
def test_live_server_with_the_hermes_parser():
    with PagodaServer(["--max-model-len", "2048", "--enable-auto-tool-choice",
                       "--tool-call-parser", "hermes"]) as server:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            base = {"messages": [{"role": "user", "content": "What's the weather in Paris?"}],
                    "tools": [WEATHER], "temperature": 0, "max_tokens": 24}
            for choice, field in (({"type": "function", "function": {"name": "no_such_tool"}}, "tool_choice"),
                                  ("sometimes", "tool_choice")):
                r = http.post("/v1/chat/completions", json={**base, "tool_choice": choice})
                assert r.status_code == 400, r.text
                assert r.json()["error"]["param"] == field
            # the bundled 135M model answers in prose: content comes back whole, nothing lost,
            # and the stream carries the same text
            client = server.openai_client()
            full = client.chat.completions.create(model="SmolLM2-135M-Instruct", **base,
                                                  tool_choice="auto")
            msg = full.choices[0]
            assert msg.message.content and not msg.message.tool_calls
            assert msg.finish_reason in ("stop", "length")
            stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", **base,
                                                    tool_choice="auto", stream=True)
            streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert streamed == msg.message.content
