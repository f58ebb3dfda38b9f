"""Structured outputs, forced tool calls and reasoning through a live `pagoda serve` (bundled
SmolLM2) and the official openai SDK: 22 JSON schemas whose outputs must validate (jsonschema),
choice / regex / grammar / json_object, vLLM's and the older guided_* fields, 400s naming the
field, tool_choice required and named, --reasoning-parser on an output a grammar makes, and
--structured-outputs-compile-timeout on a schema that really compiles for long."""
from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest

from server_utils import PagodaServer
from test_structured_outputs import slow_enum_schema

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
KEY = "sk-structured"
COMPILE_TIMEOUT_S = 3   # the schemas here compile in milliseconds; slow_enum_schema's takes ~25 s

S = {"type": "string", "maxLength": 16}
SCHEMAS = [
    ("a person", {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                                   "member": {"type": "boolean"}},
                  "required": ["name", "age", "member"]}),
    ("a city", {"type": "object", "properties": {"name": S, "country": {"enum": ["France", "Japan", "Peru"]},
                                                 "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
                "required": ["name", "country", "population"]}),
    ("a color", {"type": "string", "enum": ["red", "green", "blue"]}),
    ("some scores", {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                     "minItems": 1, "maxItems": 4}),
    ("a user", {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                                  "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                           "maxItems": 3}},
                 "required": ["id", "tags"]},
        "active": {"type": "boolean"}}, "required": ["user", "active"]}),
    ("yes or no", {"type": "boolean"}),
    ("a dice roll", {"type": "integer", "minimum": 1, "maximum": 6}),
    ("a product", {"type": "object", "properties": {"sku": S, "note": S, "stock": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 999}},
                   "required": ["sku"]}),
    ("some points", {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": -99, "maximum": 99},
                                         "y": {"type": "integer", "minimum": -99, "maximum": 99}},
        "required": ["x", "y"]}}),
    ("a code", {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}),
    ("a status", {"type": "object", "properties": {"version": {"const": "1.0"}, "ok": {"type": "boolean"}},
                  "required": ["version", "ok"]}),
    ("a digit or nothing", {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "null"}]}),
    ("a deep value", {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "object", "properties": {"c": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]}),
    ("a level", {"type": "integer", "enum": [1, 2, 3]}),
    ("some items", {"$defs": {"item": {"type": "object", "properties": {"n": S, "q": {"type": "integer", "minimum": 1,
                                                                                      "maximum": 9}},
                                       "required": ["n", "q"]}},
                    "type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 2}),
    ("a date", {"type": "string", "format": "date"}),
    ("a palette", {"type": "object", "properties": {"colors": {"type": "array", "maxItems": 3, "items": {
        "enum": ["red", "green", "blue"]}}}, "required": ["colors"]}),
    ("a book", {"type": "object", "properties": {"title": {"type": "string", "maxLength": 30},
                                                 "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
                                                 "genres": {"type": "array", "maxItems": 2,
                                                            "items": {"enum": ["fiction", "history", "science"]}}},
                "required": ["title", "year", "genres"]}),
    ("a nickname or null", {"type": ["string", "null"], "maxLength": 10}),
    ("an order", {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "lines": {"type": "array", "maxItems": 2, "minItems": 1, "items": {"type": "object", "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}, "qty": {"type": "integer", "minimum": 1,
                                                                                "maximum": 9}},
            "required": ["sku", "qty"]}},
        "paid": {"type": "boolean"}}, "required": ["id", "lines", "paid"]}),
    ("the weather", {"type": "object", "properties": {"city": S, "temp_c": {"type": "integer", "minimum": -50,
                                                                             "maximum": 60},
                                                      "sky": {"enum": ["sunny", "cloudy", "rain"]}},
                     "required": ["city", "temp_c", "sky"]}),
    ("three switches", {"type": "object", "properties": {k: {"type": "boolean"} for k in "abc"},
                        "required": ["a", "b", "c"]}),
]

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time in a timezone", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string", "maxLength": 12}}, "required": ["tz"]}}}


@pytest.fixture(scope="module")
def server():
    with PagodaServer(["--max-model-len", "2048", "--api-key", KEY, "--enable-auto-tool-choice",
                       "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
                       "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
                       "--structured-outputs-compile-timeout", str(COMPILE_TIMEOUT_S),
                       "--disable-log-requests"]) as s:
        yield s


def chat(client, content: str, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          temperature=0, **kw)


def _gather(*coros):
    async def run():
        return await asyncio.gather(*coros)
    return asyncio.run(run())


def test_json_schemas_validate(server):
    """22 schemas at once (one batch): every output parses and validates against its schema."""
    client = server.async_openai_client(api_key=KEY, timeout=600)

    async def one(what, schema):
        r = await client.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=160,
            messages=[{"role": "user", "content": f"Reply with JSON describing {what}."}],
            response_format={"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}})
        return r.choices[0]

    async def run():
        return await asyncio.gather(*(one(w, s) for w, s in SCHEMAS))
    choices = asyncio.run(run())
    assert len(SCHEMAS) >= 20
    for (what, schema), ch in zip(SCHEMAS, choices):
        assert ch.finish_reason == "stop", (what, ch.message.content)
        jsonschema.validate(json.loads(ch.message.content), schema)


def test_choice_regex_grammar_and_json_object(server):
    cases = [
        ({"structured_outputs": {"choice": ["Paris", "London", "Rome"]}}, lambda t: t in ("Paris", "London", "Rome")),
        ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
        ({"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}}, lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t)),
        ({"guided_regex": r"(cat|dog)s? [a-z]{2,8}"}, lambda t: re.fullmatch(r"(cat|dog)s? [a-z]{2,8}", t)),
        ({"structured_outputs": {"grammar": 'root ::= "The answer is " [0-9] "."'}},
         lambda t: re.fullmatch(r"The answer is [0-9]\.", t)),
        ({"guided_grammar": 'start: "ok" | "not ok"'}, lambda t: t in ("ok", "not ok")),
        ({"guided_json": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                          "required": ["n"]}}, lambda t: json.loads(t)["n"] in range(10)),
        ({"structured_outputs": {"json": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}}},
         lambda t: set(json.loads(t)) <= {"a", "b"}),
    ]
    aclient = server.async_openai_client(api_key=KEY, timeout=600)

    def ask(content, max_tokens, **kw):
        return aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                               temperature=0, max_tokens=max_tokens, **kw)
    results = _gather(
        *[ask("Answer briefly: what is the capital of France?", 40, extra_body=extra) for extra, _ in cases],
        ask('Reply with the JSON object {"answer": 4}.', 80, response_format={"type": "json_object"}),
        aclient.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
                                   extra_body={"guided_choice": [" Paris", " Lyon"]}),
        ask("Say hi.", 8), ask("Say hi.", 8, response_format={"type": "text"}))
    for (extra, ok), r in zip(cases, results):
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop" and ok(text), (extra, text)
    obj, completion, free, text_format = results[len(cases):]
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    assert completion.choices[0].text in (" Paris", " Lyon")   # /v1/completions takes the same fields
    assert text_format.choices[0].message.content == free.choices[0].message.content  # text: no constraint


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema", "Unsupported type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema", ""),
    ({"structured_outputs": {"grammar": "root ::= missing_rule"}}, "structured_outputs.grammar", "not defined"),
    ({"structured_outputs": {"json": {"type": 5}}}, "structured_outputs.json", ""),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"json": {"type": "object"}, "whitespace_pattern": "[ "}},
     "structured_outputs.whitespace_pattern", ""),
    ({"guided_regex": "(unclosed"}, "guided_regex", "parenthesis"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_grammar": "start: ("}, "guided_grammar", ""),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice", "only one kind"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "needs `tools`"),
    ({"tools": [WEATHER], "tool_choice": "required", "guided_choice": ["a"]}, "tool_choice", "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools", "Unsupported type"),
])
def test_bad_constraints_are_400s_naming_the_field(server, body, param, message):
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"], err
    assert err["type"] == "invalid_request_error"


def test_the_sdk_sees_the_400(server):
    client = server.openai_client(api_key=KEY)
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "hi", max_tokens=4, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "bogus"}}}}})
    assert e.value.body["param"] == "response_format.json_schema.schema"


PROMPTS = ["What's the weather in Paris?", "What time is it in Tokyo?", "Is it raining in London?",
           "Tell me the weather in Lima in fahrenheit."]


def _check_call(call, tools) -> None:
    fn = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), fn["parameters"])
    assert call.type == "function" and call.id


def test_tool_choice_required_and_named_always_give_valid_calls(server):
    client = server.async_openai_client(api_key=KEY, timeout=600)
    tools = [WEATHER, TIME]

    def ask(prompt, choice, **kw):
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                              temperature=0, max_tokens=120, tools=tools, tool_choice=choice, **kw)
    named = {"type": "function", "function": {"name": "get_time"}}
    results = _gather(*[ask(p, "required") for p in PROMPTS], *[ask(p, named) for p in PROMPTS],
                      ask(PROMPTS[0], "required", parallel_tool_calls=False))
    for r in results[:len(PROMPTS)]:
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.tool_calls and ch.message.content is None
        for call in ch.message.tool_calls:
            _check_call(call, tools)
    for r in results[len(PROMPTS):-1]:
        ch = r.choices[0]
        assert ch.finish_reason == "stop" and [c.function.name for c in ch.message.tool_calls] == ["get_time"]
        _check_call(ch.message.tool_calls[0], tools)
    assert len(results[-1].choices[0].message.tool_calls) == 1


def test_streamed_forced_calls_equal_the_whole(server):
    client = server.async_openai_client(api_key=KEY, timeout=600)

    async def one(choice, stream):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0, max_tokens=120,
                  tools=[WEATHER, TIME], tool_choice=choice)
        if not stream:
            return (await client.chat.completions.create(**kw)).choices[0]
        calls: dict[int, dict] = {}
        finish = None
        async for chunk in await client.chat.completions.create(**kw, stream=True):
            if not chunk.choices:
                continue
            finish = chunk.choices[0].finish_reason or finish
            for tc in chunk.choices[0].delta.tool_calls or []:
                c = calls.setdefault(tc.index, {"name": None, "arguments": ""})
                c["name"] = tc.function.name or c["name"]
                c["arguments"] += tc.function.arguments or ""
        return finish, calls
    choices = ({"type": "function", "function": {"name": "get_weather"}}, "required")
    results = _gather(*[one(c, False) for c in choices], *[one(c, True) for c in choices])
    for whole, (finish, calls) in zip(results[:2], results[2:]):
        assert finish == whole.finish_reason
        assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
            [(t.function.name, json.loads(t.function.arguments)) for t in whole.message.tool_calls]


def test_reasoning_content_split_on_a_real_output(server):
    """A grammar makes the model write Qwen3's thinking form; --reasoning-parser qwen3 splits it."""
    client = server.openai_client(api_key=KEY, timeout=300)
    form = {"structured_outputs": {"regex": r"<think>\n[a-z ]{1,30}\n</think>\n\n(Paris|Lyon)"}}
    r = chat(client, "What is the capital of France?", max_tokens=40, extra_body=form)
    msg = r.choices[0].message
    reasoning = msg.model_extra["reasoning_content"]
    assert re.fullmatch(r"\n[a-z ]{1,30}\n", reasoning) and msg.content in ("Paris", "Lyon")
    streamed = {"reasoning_content": "", "content": ""}
    for chunk in chat(client, "What is the capital of France?", max_tokens=40, extra_body=form, stream=True):
        if chunk.choices:
            d = chunk.choices[0].delta
            streamed["reasoning_content"] += (d.model_extra or {}).get("reasoning_content") or ""
            streamed["content"] += d.content or ""
    assert streamed == {"reasoning_content": reasoning, "content": msg.content}
    # without <think> in the output (Qwen3 with enable_thinking false) everything is content
    plain = chat(client, "Say hi.", max_tokens=8, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert plain.choices[0].message.content and "reasoning_content" not in (plain.choices[0].message.model_extra or {})


def test_routes_need_the_api_key(server):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "hi"}], "guided_choice": ["a"]})
    assert r.status_code == 401


def test_a_grammar_that_compiles_too_long_is_a_400_and_others_are_served(server):
    """Last in this module (its compilation runs on in the background). The slow schema is a 400
    naming the field after about the flag's seconds, while a free request and a quick
    constrained one are answered; the same schema again, from another field, is a 400 at once."""
    client = server.openai_client(api_key=KEY, timeout=120)
    slow = slow_enum_schema()
    headers = {"Authorization": f"Bearer {KEY}"}

    async def post(route, body):
        async with httpx.AsyncClient(timeout=120) as c:
            t0 = asyncio.get_running_loop().time()
            r = await c.post(server.url + route, headers=headers, json={"model": MODEL, "max_tokens": 4, **body})
            return r, asyncio.get_running_loop().time() - t0

    msgs = [{"role": "user", "content": "Pick one."}]
    (bad, t_bad), (quick, _), (free, t_free) = _gather(
        post("/v1/chat/completions", {"messages": msgs, "response_format": {
            "type": "json_schema", "json_schema": {"name": "slow", "schema": slow}}}),
        post("/v1/chat/completions", {"messages": msgs, "guided_choice": ["yes", "no"], "temperature": 0}),
        post("/v1/completions", {"prompt": "The capital of France is", "temperature": 0}))
    assert bad.status_code == 400, bad.text[:300]
    err = bad.json()["error"]
    assert err["param"] == "response_format.json_schema.schema"
    assert err["message"] == (f"response_format.json_schema.schema: the grammar did not compile within "
                              f"{COMPILE_TIMEOUT_S} s (--structured-outputs-compile-timeout)")
    assert COMPILE_TIMEOUT_S <= t_bad < 4 * COMPILE_TIMEOUT_S
    assert quick.status_code == 200 and quick.json()["choices"][0]["message"]["content"] in ("yes", "no")
    assert free.status_code == 200 and t_free < t_bad
    # the same constraint from other fields: refused at once, each naming its own field
    for route, body, param in [
            ("/v1/completions", {"prompt": "hi", "structured_outputs": {"json": slow}}, "structured_outputs.json"),
            ("/v1/chat/completions", {"messages": msgs, "tools": [{"type": "function", "function": {
                "name": "pick", "parameters": slow}}], "tool_choice": {"type": "function", "function": {
                    "name": "pick"}}}, "tools.0.function.parameters")]:
        (r, took), = _gather(post(route, body))
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text[:300]
        assert took < COMPILE_TIMEOUT_S
    with pytest.raises(openai.BadRequestError) as e:   # and through the SDK
        chat(client, "hi", max_tokens=4, extra_body={"guided_json": slow})
    assert e.value.body["param"] == "guided_json"
