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


# ------------------------------------------------------------------ the other parsers' formats

from pagoda.entrypoints.openai.tool_parsers import TOOL_CALL_PARSERS  # noqa: E402

TOOLS = [WEATHER, {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string"}, "days": {"type": "integer"},
                                     "exact": {"type": "boolean"}, "where": {"type": "object"}}}}}]

# parser -> (constructed model output, content, [(name, arguments)])
CONSTRUCTED = {
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lyon"}}; {"name": "get_time", '
         '"parameters": {"tz": "UTC"}}', None, [("get_weather", {"city": "Lyon"}), ("get_time", {"tz": "UTC"})]),
        ("It is sunny in Paris.", "It is sunny in Paris.", []),
        ('{"name": "get_weather", "parameters": {"city": ', '{"name": "get_weather", "parameters": {"city": ', []),
        ('<|python_tag|>{"name": "get_time", "parameters": {}}<|eom_id|>', None, [("get_time", {})]),
    ],
    "mistral": [
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", '
         '"arguments": {}}]', None, [("get_weather", {"city": "Paris"}), ("get_time", {})]),
        ('Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}', "Checking.", [("get_weather", {"city": "Rome"})]),
        ("No tools needed.", "No tools needed.", []),
        ("[TOOL_CALLS][{broken", "[TOOL_CALLS][{broken", []),
        ('[TOOL_CALLS][{"name": "get_time", "arguments": {"tz": "CET"}}]</s>', None, [("get_time", {"tz": "CET"})]),
    ],
    "pythonic": [
        ('[get_weather(city="Paris"), get_time(tz="UTC", days=2, exact=True)]', None,
         [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC", "days": 2, "exact": True})]),
        ('<|python_start|>[get_time(where={"a": [1, 2]})]<|python_end|>', None, [("get_time", {"where": {"a": [1, 2]}})]),
        ("[not a call]", "[not a call]", []),
        ("Plain text.", "Plain text.", []),
    ],
    "qwen3_coder": [
        ("Let me look.\n<tool_call>\n<function=get_time>\n<parameter=tz>\nUTC\n</parameter>\n<parameter=days>\n3"
         "\n</parameter>\n<parameter=exact>\ntrue\n</parameter>\n</function>\n</tool_call>", "Let me look.",
         [("get_time", {"tz": "UTC", "days": 3, "exact": True})]),
        ("<tool_call>\n<function=get_weather>\n<parameter=city>\n42\n</parameter>\n</function>\n</tool_call>\n"
         "<tool_call>\n<function=get_time>\n<parameter=where>\n{\"x\": 1}\n</parameter>\n</function>\n</tool_call>",
         None, [("get_weather", {"city": "42"}), ("get_time", {"where": {"x": 1}})]),
        ("No call <here>.", "No call <here>.", []),
    ],
}


@pytest.mark.parametrize("name, case", [(n, c) for n, cases in CONSTRUCTED.items() for c in cases])
def test_parsers_read_their_formats(name, case):
    text, content, calls = case
    parsed = get_tool_parser(name).parse(text, TOOLS)
    assert parsed.content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls] == calls
    assert all(c["type"] == "function" and c["id"] for c in parsed.tool_calls)
    if name == "mistral":
        assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in parsed.tool_calls)


@pytest.mark.parametrize("name, case", [(n, c) for n, cases in CONSTRUCTED.items() for c in cases])
def test_every_parser_streams_what_it_parses(name, case):
    """Streamed deltas (cut at every character) add up to the non-streamed message."""
    parser = get_tool_parser(name)
    chat = ServingChat(SimpleNamespace(model_name="m", tool_parser=parser))
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS, stream=True)
    plan = ChatPlan([1, 2], None, TOOLS, parser)
    text = case[0]
    whole = chat._response(req, plan, "id", list(_outputs(text, []))[-1]).choices[0]

    async def collect():
        return [e async for e in chat._stream(req, plan, "id", _agen(_outputs(text, list(range(1, len(text))))))]
    chunks = [json.loads(e[len("data: "):]) for e in asyncio.run(collect())[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    calls = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    assert [tc["function"]["name"] for tc in calls] == [tc["function"]["name"] for tc in whole.message.tool_calls]
    assert [json.loads(tc["function"]["arguments"]) for tc in calls] == \
        [json.loads(tc["function"]["arguments"]) for tc in whole.message.tool_calls]
    assert content.strip() == (whole.message.content or "").strip()
    assert set(TOOL_CALL_PARSERS) == {"hermes", *CONSTRUCTED}


@pytest.mark.parametrize("name", ["hermes", "llama3_json", "mistral"])
def test_strict_tools_structural_tag_holds_calls_to_their_schema(name, smollm_side_dir):
    """tool_choice auto with a strict tool: free text, but a call, once opened, must match."""
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast
    from pagoda.sampling_params import StructuredOutputsParams
    from pagoda.structured_output.grammar import build_grammar
    tok = PreTrainedTokenizerFast.from_pretrained(smollm_side_dir)
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok)))
    parser = get_tool_parser(name)
    strict = [{"type": "function", "function": dict(WEATHER["function"], strict=True)}]
    grammar = compiler.compile_grammar(build_grammar(StructuredOutputsParams(
        structural_tag=parser.structural_tag(strict))))

    def ok(text):
        m = xgr.GrammarMatcher(grammar)
        return m.accept_string(text)
    begin, end = parser.call_begin_end("get_weather")
    good = f'{begin}{{"city": "Paris"}}{end}'
    assert ok("Some prose first. " + good) or name == "llama3_json"
    assert ok(good)
    assert not ok(f'{begin}{{"town": "Paris"}}{end}')       # not the tool's schema
    assert not ok(begin.replace("get_weather", "other"))    # not a tool
    assert get_tool_parser(name).parse(good, strict).tool_calls[0]["function"]["name"] == "get_weather"
