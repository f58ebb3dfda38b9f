"""One client must never hurt the others (issue: hostile inputs), against a live `pagoda serve`
started as the adversarial pass started it: --api-key k1 --max-model-len 2048
--max-concurrent-requests 16, the bundled model.

Each test sends the hostile request and, while it is in flight, a normal "victim" request, and
checks both: the hostile one gets a clear error, the victim its normal answer within a bound.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import pytest

from server_utils import PagodaServer

pytestmark = pytest.mark.slow

KEY = "k1"
AUTH = {"Authorization": f"Bearer {KEY}"}
BASE_ARGS = ["--api-key", KEY, "--max-model-len", "2048", "--max-concurrent-requests", "16"]
HOSTILE_TEMPLATE = ("{% set ns=namespace(x=0) %}{% for i in range(3000) %}{% for j in range(3000) %}"
                    "{% set ns.x=ns.x+1 %}{% endfor %}{% endfor %}{{ns.x}}")
VICTIM = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
          "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    with PagodaServer(BASE_ARGS) as s:
        yield s


@pytest.fixture(scope="module")
def trusting_server():
    """An operator who allows request templates: they are still bounded."""
    with PagodaServer(BASE_ARGS + ["--trust-request-chat-template"]) as s:
        yield s


def post(server, path: str, body, timeout: float = 120) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=AUTH, timeout=timeout)


def chat(server, body=VICTIM) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = post(server, "/v1/chat/completions", body)
    return r, time.monotonic() - t0


def stream_chat(server, body=VICTIM) -> tuple[list[dict], float]:
    """A streamed chat: its JSON events (checked to end in [DONE]) and how long it took."""
    t0 = time.monotonic()
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True},
                      headers=AUTH, timeout=120) as r:
        assert r.status_code == 200, r.read()
        data = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert data[-1] == "[DONE]", data[-3:]
    return [json.loads(d) for d in data[:-1]], time.monotonic() - t0


def text_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    return err


# ------------------------------------------------------------------- defect 1: chat templates

def test_request_chat_template_is_refused_by_default(server):
    err = error_of(post(server, "/v1/chat/completions", {**VICTIM, "chat_template": "{{ 'x' }}"}), 400)
    assert err["param"] == "chat_template" and "--trust-request-chat-template" in err["message"]
    err = error_of(post(server, "/tokenize", {"messages": VICTIM["messages"],
                                             "chat_template": "{{ 'x' }}"}), 400)
    assert err["param"] == "chat_template"
    # a template smuggled in through chat_template_kwargs is refused too
    err = error_of(post(server, "/v1/chat/completions",
                        {**VICTIM, "chat_template_kwargs": {"chat_template": "{{ 'x' }}"}}), 400)
    assert err["param"] == "chat_template_kwargs"


def test_trusted_request_template_is_used(trusting_server):
    body = {"messages": [{"role": "user", "content": "hi"}],
            "chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"}
    r = post(trusting_server, "/tokenize", body)
    assert r.status_code == 200, r.text
    detok = post(trusting_server, "/detokenize", {"tokens": r.json()["tokens"]})
    assert detok.json()["prompt"] == "<user>hi"


def test_hostile_template_is_bounded_and_does_not_stall_others(trusting_server):
    reference = text_of(chat(trusting_server)[0])
    hostile = {**VICTIM, "chat_template": HOSTILE_TEMPLATE}
    with cf.ThreadPoolExecutor(4) as pool:
        bad = pool.submit(chat, trusting_server, hostile)
        time.sleep(0.5)  # the hostile template is rendering now
        victims = [pool.submit(chat, trusting_server) for _ in range(2)]
        streamed = pool.submit(stream_chat, trusting_server)
        for v in victims:
            r, took = v.result()
            assert text_of(r) == reference
            assert took < 2.0, f"a normal chat took {took:.2f}s while a hostile template rendered"
        events, took = streamed.result()
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                       if e["choices"]) == reference
        assert took < 2.0
        r, took = bad.result()
    err = error_of(r, 400)
    assert err["param"] == "chat_template" and "longer than" in err["message"]
    assert took < 15, f"the hostile template ran {took:.1f}s"


@pytest.mark.parametrize("template,needle", [
    ('{{ "x" * 100000000000 }}', "`*`"),
    ("{% for i in range(10000000) %}{% endfor %}", "range()"),
    ("{{ 7 ** 100000000 }}", "`**`"),
    ("{% for x in ", "not a valid Jinja template"),
])
def test_template_budgets(trusting_server, template, needle):
    t0 = time.monotonic()
    err = error_of(post(trusting_server, "/v1/chat/completions", {**VICTIM, "chat_template": template}), 400)
    assert needle in err["message"] and err["param"] == "chat_template"
    assert time.monotonic() - t0 < 5


def test_disconnect_stops_a_hostile_template(trusting_server):
    """A client that gives up frees the render thread: four such clients (as many as render
    threads) leave the server rendering normally at once, not 4 x the budget later."""
    hostile = {**VICTIM, "chat_template": HOSTILE_TEMPLATE}
    for _ in range(4):
        with pytest.raises(httpx.TimeoutException):
            post(trusting_server, "/v1/chat/completions", hostile, timeout=0.5)
    time.sleep(1.0)  # the disconnects reach the server; their renderings stop at the next check
    body = {**VICTIM, "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}
    r, took = chat(trusting_server, body)
    assert r.status_code == 200, r.text
    assert took < 2.0, f"a chat waited {took:.2f}s behind abandoned renderings"


# ------------------------------------------------------------ defect 2: out-of-range integers

@pytest.mark.parametrize("field,value", [
    ("top_k", 9223372036854775808),
    ("top_k", 2**31),
    ("min_tokens", 2**40),
    ("stop_token_ids", [2**63]),
    ("stop_token_ids", [-1]),
    ("seed", 2**64),
    ("max_tokens", 2**63),
    ("max_tokens", True),
    ("n", True),
    ("top_logprobs", 2**63),
])
def test_out_of_range_integers_are_400_and_neighbours_unharmed(server, field, value):
    reference = text_of(chat(server)[0])
    with cf.ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(stream_chat, server) for _ in range(2)]
        plain = pool.submit(chat, server)
        time.sleep(0.05)
        body = {**VICTIM, field: value}
        if field == "top_logprobs":
            body["logprobs"] = True
        err = error_of(post(server, "/v1/chat/completions", body), 400)
        assert (err["param"] or "").startswith(field), err
        for s in streams:
            events, _ = s.result()
            assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                           if e["choices"]) == reference
            assert not any("error" in e for e in events)
        assert text_of(plain.result()[0]) == reference


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": [1, 2, 9223372036854775808], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": [True, False], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "logprobs": 2**63}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "logit_bias": {"9223372036854775808": 1}},
     "logit_bias"),
    ("/detokenize", {"tokens": [2**63]}, "tokens"),
])
def test_out_of_range_integers_elsewhere_are_400(server, path, body, param):
    err = error_of(post(server, path, body), 400)
    assert (err["param"] or "").startswith(param), err
