"""The Responses API: input items -> chat messages, the bounded store (LRU, TTL), and a live
`pagoda serve` driven by the official SDK's `client.responses`: plain, streamed (typed events,
sequence numbers, the deltas adding up), previous_response_id, text.format json_schema, tools,
function_call_output, background + retrieve (and its stream replay) + cancel, 404s and 400s."""
from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest

from pagoda.entrypoints.openai.errors import OpenAIError
from pagoda.entrypoints.openai.protocol import ResponseObject
from pagoda.entrypoints.openai.responses_store import ResponseStore, StoredResponse
from pagoda.entrypoints.openai.serving_responses import input_messages
from server_utils import PagodaServer

MODEL = "SmolLM2-135M-Instruct"
KEY = "sk-responses"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}


# ----------------------------------------------------------------------------------- offline

def test_input_items_become_chat_messages():
    assert input_messages("hi") == [{"role": "user", "content": "hi"}]
    msgs = input_messages([
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather"},
                                                        {"type": "input_text", "text": "in Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": "not json"},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C, sunny"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "It is sunny."}]},
    ])
    assert msgs == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather\nin Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
        {"role": "assistant", "content": "It is sunny."}]
    for bad, where in (([{"role": "robot", "content": "x"}], "input[0]"),
                       ([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}], "input[0]"),
                       (["just a string in a list"], "input[0]"),
                       ([{"role": "user", "content": "ok"}, {"type": "web_search_call"}], "input[1]"),
                       ([{"type": "function_call_output", "output": "x"}], "input[0]")):
        with pytest.raises(OpenAIError) as e:
            input_messages(bad)
        assert e.value.param == where and e.value.status == 400


def _stored(rid: str, status: str = "completed") -> StoredResponse:
    return StoredResponse(ResponseObject(id=rid, status=status, model="m"))


def test_store_is_bounded_lru_with_a_ttl(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    store = ResponseStore(max_size=3, ttl_s=60)
    for rid in "abc":
        store.put(_stored(rid))
    assert store.get("a") is not None           # a is now the most recently used
    store.put(_stored("d"))                     # evicts b, the least recently used
    assert store.get("b") is None and len(store) == 3
    running = _stored("e", "in_progress")
    store.put(running)                          # evicts c: finished ones go before a running one
    assert store.get("c") is None and store.get("e") is running
    now[0] += 61                                # TTL: unused for more than 60 s
    assert store.get("a") is None and store.get("d") is None
    assert store.get("e") is running            # still running: not expired
    now[0] += 30
    store.put(_stored("f"))
    assert len(store) == 2


# -------------------------------------------------------------------------------------- live

@pytest.fixture(scope="module")
def server():
    with PagodaServer(["--max-model-len", "2048", "--api-key", KEY, "--disable-log-requests",
                       "--responses-store-size", "16", "--responses-store-ttl", "600",
                       "--structured-outputs-config", '{"disable_any_whitespace": true}']) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client(api_key=KEY, timeout=300)




@pytest.mark.slow
def test_plain_response(client):
    r = client.responses.create(model=MODEL, input="What is the capital of France?", max_output_tokens=16,
                                temperature=0, instructions="Answer in one sentence.", metadata={"k": "v"})
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.status in ("completed", "incomplete") and r.output_text
    msg = r.output[0]
    assert msg.type == "message" and msg.role == "assistant" and msg.content[0].type == "output_text"
    assert msg.id.startswith("msg_")
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 16
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "Answer in one sentence." and r.metadata == {"k": "v"} and r.max_output_tokens == 16
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    again = client.responses.retrieve(r.id)
    assert again.output_text == r.output_text and again.status == r.status
    # same request through chat completions: the same text (the same prompt and sampling)
    chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=16, messages=[
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "What is the capital of France?"}])
    assert chat.choices[0].message.content == r.output_text


@pytest.mark.slow
def test_streamed_response_events(client):
    events = list(client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=12, temperature=0,
                                          stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          events[-1].type]
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == final.output_text == events[-4].text
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    stored = client.responses.retrieve(final.id)
    assert stored.output_text == deltas
    plain = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=12, temperature=0)
    assert plain.output_text == deltas


@pytest.mark.slow
def test_previous_response_id_continues_the_conversation(client, server):
    first = client.responses.create(model=MODEL, input="My name is Ada. Say OK.", max_output_tokens=8, temperature=0)
    second = client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=8, temperature=0)
    assert second.previous_response_id == first.id
    # the second prompt holds the first turn: its input is longer than the first's input and output
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0   # the shared prefix came from the cache
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_nope", max_output_tokens=4)
    assert e.value.body["param"] == "previous_response_id"
    unstored = client.responses.create(model=MODEL, input="hi", store=False, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


@pytest.mark.slow
def test_text_format_json_schema_and_its_errors(client, server):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "sunny": {"type": "boolean"}}, "required": ["city", "sunny"]}
    r = client.responses.create(model=MODEL, input="Describe the weather in Paris as JSON.", max_output_tokens=60,
                                temperature=0, text={"format": {"type": "json_schema", "name": "w", "schema": schema,
                                                                "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)
    h = {"Authorization": f"Bearer {KEY}"}
    bad = httpx.post(server.url + "/v1/responses", headers=h, timeout=60, json={
        "input": "x", "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "nonsense"}}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "text.format.schema", bad.text
    for body, param in (({"input": [{"role": "robot", "content": "x"}]}, "input[0]"),
                        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0]"),
                        ({"input": "x", "background": True, "store": False}, "background"),
                        ({"input": []}, "input"),
                        ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
                         "tool_choice")):
        r = httpx.post(server.url + "/v1/responses", headers=h, json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


@pytest.mark.slow
def test_tools_function_calls_and_their_outputs(client):
    r = client.responses.create(model=MODEL, input="What's the weather in Paris?", tools=[WEATHER],
                                tool_choice="required", max_output_tokens=60, temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and all(c.name == "get_weather" and c.call_id.startswith("call_") for c in calls)
    for c in calls:
        jsonschema.validate(json.loads(c.arguments), WEATHER["parameters"])
    streamed = list(client.responses.create(model=MODEL, input="What's the weather in Paris?", tools=[WEATHER],
                                            tool_choice={"type": "function", "name": "get_weather"},
                                            max_output_tokens=60, temperature=0, stream=True))
    types = [e.type for e in streamed]
    assert "response.function_call_arguments.delta" in types and "response.function_call_arguments.done" in types
    done = next(e for e in streamed if e.type == "response.function_call_arguments.done")
    args = "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    assert done.arguments == args and json.loads(args)["city"]
    # the tool's result goes back as function_call_output, continuing from the stored response
    follow = client.responses.create(model=MODEL, previous_response_id=r.id, max_output_tokens=12, temperature=0,
                                     input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                             "output": "18 degrees and sunny"}])
    assert follow.status in ("completed", "incomplete") and follow.output_text
    assert follow.usage.input_tokens > r.usage.input_tokens


@pytest.mark.slow
def test_background_retrieve_replay_and_cancel(client, server):
    bg = client.responses.create(model=MODEL, input="Write a long story about the sea.", max_output_tokens=400,
                                 temperature=0, background=True)
    assert bg.background and bg.status in ("queued", "in_progress")
    time.sleep(2)
    running = client.responses.retrieve(bg.id)
    assert running.status == "in_progress"
    # replay from the start while it runs: the first events are the stream's
    with client.responses.retrieve(bg.id, stream=True) as stream:
        first = [e for _, e in zip(range(3), stream)]
    assert [e.type for e in first] == ["response.created", "response.in_progress", "response.output_item.added"]
    cancelled = client.responses.cancel(bg.id)
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(bg.id).status == "cancelled"
    assert client.responses.cancel(bg.id).status == "cancelled"   # cancelling again changes nothing
    # a short background response runs to the end; its replay after some sequence number
    short = client.responses.create(model=MODEL, input="Say hi.", max_output_tokens=6, temperature=0, background=True)
    deadline = time.time() + 120
    while client.responses.retrieve(short.id).status == "in_progress" and time.time() < deadline:
        time.sleep(0.5)
    done = client.responses.retrieve(short.id)
    assert done.status in ("completed", "incomplete") and done.output_text
    events = list(client.responses.retrieve(short.id, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == done.output_text
    tail = list(client.responses.retrieve(short.id, stream=True, starting_after=3))
    assert [e.sequence_number for e in tail] == list(range(4, len(events)))
    # only background responses can be cancelled or streamed again; unknown ids are 404
    h = {"Authorization": f"Bearer {KEY}"}
    plain = client.responses.create(model=MODEL, input="hi", max_output_tokens=4)
    assert httpx.post(f"{server.url}/v1/responses/{plain.id}/cancel", headers=h).status_code == 400
    assert httpx.get(f"{server.url}/v1/responses/{plain.id}?stream=true", headers=h).status_code == 400
    for method, path in (("GET", "/v1/responses/resp_missing"), ("POST", "/v1/responses/resp_missing/cancel")):
        r = httpx.request(method, server.url + path, headers=h)
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"


@pytest.mark.slow
def test_responses_routes_need_the_api_key(server):
    for method, path in (("POST", "/v1/responses"), ("GET", "/v1/responses/resp_x"),
                         ("POST", "/v1/responses/resp_x/cancel")):
        r = httpx.request(method, server.url + path, json={"input": "hi"} if method == "POST" else None)
        assert r.status_code == 401, (path, r.text)
