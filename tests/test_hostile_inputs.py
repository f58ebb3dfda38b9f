"""One client must never hurt the others (issue: hostile inputs), against a live `pagoda serve`
started as the adversarial pass started it: --api-key k1 --max-model-len 2048
--max-concurrent-requests 16, the bundled model.

Each test sends the hostile request and, while it is in flight, a normal "victim" request, and
checks both: the hostile one gets a clear error, the victim its normal answer within a bound.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import random
import socket
import string
import threading
import time

import httpx
import pytest

from server_utils import HOST, PagodaServer, free_port, metric, parse_metrics

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
def limits_server():
    """Short body timeout, few connections, short drain: the bounds of defects 5 and 10."""
    with PagodaServer(BASE_ARGS + ["--request-body-timeout", "2", "--max-connections", "8",
                                   "--shutdown-timeout", "2"]) as s:
        yield s


@pytest.fixture(scope="module")
def trusting_server():
    """An operator who allows request templates: they are still bounded."""
    with PagodaServer(BASE_ARGS + ["--trust-request-chat-template"]) as s:
        yield s


def post(server, path: str, body, timeout: float = 120) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=AUTH, timeout=timeout)


def post_json_text(server, path: str, body) -> httpx.Response:
    """Like post, with lone surrogates sent as JSON escapes (valid JSON, not valid UTF-8)."""
    return httpx.post(server.url + path, content=json.dumps(body), timeout=120,
                      headers={**AUTH, "Content-Type": "application/json"})


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


def alone(server) -> tuple[str, float]:
    """The victim's answer and time with nothing hostile in flight (a failing bound reports it:
    on a shared machine the victim alone can be slow)."""
    r, took = chat(server)
    return text_of(r), took


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
    # free-form JSON (schemas, tools) travels to the engine core: its integers must fit the wire
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "guided_json": {"": -(1 << 63) - 1}},
     "guided_json"),
    ("/v1/chat/completions", {**VICTIM, "response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "integer", "minimum": 1 << 64}}}}, "response_format"),
    ("/v1/chat/completions", {**VICTIM, "structured_outputs": {"json": {"maximum": -(1 << 70)}}},
     "structured_outputs"),
    ("/v1/chat/completions", {**VICTIM, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "integer", "maximum": 1 << 64}}}]}, "tools"),
])
def test_out_of_range_integers_elsewhere_are_400(server, path, body, param):
    err = error_of(post(server, path, body), 400)
    assert (err["param"] or "").startswith(param), err


def test_a_schema_given_as_text_with_huge_integers_is_not_a_500(server):
    schema = '{"type": "integer", "minimum": 18446744073709551616}'
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "guided_json": schema})
    assert r.status_code in (200, 400), r.text
    assert text_of(chat(server)[0])  # and the server still answers


# ------------------------------------------------------------------------- raw HTTP helpers

def http_request(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", f"Authorization: Bearer {KEY}",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request and its response on an open (keep-alive) connection."""
    sock.sendall(request)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response: {buf!r}")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed in the middle of a response body")
        body += chunk
    return int(lines[0].split()[1]), headers, body


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


# --------------------------------------------- defect 3: lone surrogates, well-formed 500s

@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/chat/completions", rb'{"model":"\ud800","messages":[{"role":"user","content":"hi"}]}', 404, "model"),
    ("/tokenize", rb'{"model":"\ud800","prompt":"hi"}', 404, "model"),
    ("/v1/chat/completions", rb'{"messages":[{"role":"user","content":"\ud800"}],"max_tokens":2}', 400,
     "messages.0.content"),
    ("/v1/chat/completions", rb'{"messages":[{"role":"\udfff","content":"x"}],"max_tokens":2}', 400,
     "messages.0.role"),
    ("/v1/chat/completions", rb'{"messages":[{"role":"user","content":"x"}],"stop":["\ud800"]}', 400,
     "stop"),
    ("/v1/completions", rb'{"prompt":"a\ud83d","max_tokens":2}', 400, "prompt"),
    ("/v1/completions", rb'{"prompt":["ok","\udfff"],"max_tokens":2}', 400, "prompt.1"),
    ("/tokenize", rb'{"prompt":"\ud800"}', 400, "prompt"),
    ("/v1/embeddings", rb'{"input":"\ud800"}', 400, "input"),
])
def test_lone_surrogates_are_clear_errors_on_a_live_connection(server, path, body, status, param):
    """A lone surrogate once crashed the rendering of its own error (500, connection reset).
    Now: unknown model 404 (the name escaped), bad text 400 naming the field, and the same
    keep-alive connection serves the next requests."""
    with socket.create_connection((HOST, server.port), timeout=30) as sock:
        code, headers, raw = exchange(sock, http_request("POST", path, body))
        assert code == status, raw
        assert headers.get("x-request-id") and headers["content-type"] == "application/json"
        err = json.loads(raw)["error"]
        assert (err["param"] or "").startswith(param), err
        assert "template" not in err["message"]  # completions/embeddings: no template ran
        if status == 404:
            assert "\\ud800" in err["message"]  # echoed, escaped
        code, headers, _ = exchange(sock, http_request("GET", "/health"))
        assert code == 200 and headers.get("x-request-id")
        code, _, raw = exchange(sock, http_request("POST", "/tokenize", b'{"prompt":"hi"}'))
        assert code == 200 and json.loads(raw)["count"] >= 1


def test_unhandled_errors_are_well_formed_500s_that_keep_the_connection():
    """No request reaches an unhandled exception on the live server any more (the fuzz test
    looks for one), so this runs pagoda's middleware stack in uvicorn around an app that
    raises, in a route and inside a middleware, as the server's stack would."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from pagoda.entrypoints.openai.middleware import (AdmissionMiddleware, APIKeyMiddleware,
                                                      BodySizeLimitMiddleware,
                                                      RequestContextMiddleware, ServerState)
    from pagoda.metrics import ServerMetrics

    async def boom(_):
        raise RuntimeError("a bug")

    async def ok(_):
        return PlainTextResponse("ok")

    class BrokenMiddleware:  # a middleware that fails for one path
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope.get("path") == "/broken-middleware":
                raise KeyError("middleware bug")
            await self.app(scope, receive, send)

    routes = [Route("/boom", boom, methods=["POST"]), Route("/ok", ok)]
    metrics = ServerMetrics(engine=None, model_name="m", max_model_len=16)
    app = Starlette(routes=routes, middleware=[
        Middleware(RequestContextMiddleware, metrics=metrics, routes=routes),
        Middleware(APIKeyMiddleware, api_key=KEY),
        Middleware(BodySizeLimitMiddleware, max_bytes=1 << 20, timeout_s=5),
        Middleware(AdmissionMiddleware, state=ServerState(), limit=4),
        Middleware(BrokenMiddleware)])
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="critical"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.create_connection((HOST, port), timeout=30) as sock:
            for request in (http_request("POST", "/boom", b"{}"),
                            http_request("GET", "/broken-middleware")):
                code, headers, raw = exchange(sock, request)
                assert code == 500
                rid = headers.get("x-request-id")
                assert rid and headers["content-type"] == "application/json"
                err = json.loads(raw)["error"]
                assert err["type"] == "server_error" and rid in err["message"]
                assert set(err) == {"message", "type", "param", "code"}
                code, _, raw = exchange(sock, http_request("GET", "/ok"))  # same connection
                assert (code, raw) == (200, b"ok")
        assert metrics.registry.get_sample_value("pagoda:http_requests_total", {
            "method": "POST", "route": "/boom", "status": "500"}) == 1
    finally:
        srv.should_exit = True
        thread.join(10)


# ------------------------------------------------------------ defect 4: metrics cardinality

def test_metrics_labels_hold_no_client_text(server):
    size_before = len(httpx.get(server.url + "/metrics", headers=AUTH, timeout=30).content)
    rng = random.Random(4)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        # methods HTTP parsers let through that no route has (httptools knows a fixed list:
        # an arbitrary token is its 400 before the app, h11 lets it reach the app's 405)
        exotic = ["PROPFIND", "MKCOL", "LOCK", "UNLOCK", "REPORT", "MKACTIVITY", "CHECKOUT",
                  "MERGE", "NOTIFY", "SUBSCRIBE", "UNSUBSCRIBE", "PURGE", "MKCALENDAR", "LINK",
                  "UNLINK", "SEARCH", "COPY", "MOVE", "PROPPATCH", "BIND"]
        for i in range(60):
            method = "".join(rng.choice(string.ascii_uppercase) for _ in range(4000))
            assert client.request(method, "/health").status_code in (400, 405)
            assert client.request(exotic[i % len(exotic)], "/health").status_code == 405
            assert client.get(f"/no/such/route/{method[:40]}").status_code == 404
    text = httpx.get(server.url + "/metrics", headers=AUTH, timeout=30).text
    assert method[:40] not in text
    # a handful of new series (one method and one route value), not 120 new label values
    assert len(text.encode()) - size_before < 20_000, len(text.encode()) - size_before
    samples = parse_metrics(text)
    assert metric(samples, "pagoda:http_requests_total", method="other", route="/health",
                  status="405") >= 60
    assert metric(samples, "pagoda:http_requests_total", method="GET", route="other",
                  status="404") >= 60


# -------------------------------------------------------------------- defect 6: stop strings

def test_stop_string_limits(server):
    reference, base = alone(server)
    with cf.ThreadPoolExecutor(2) as pool:
        huge = {"prompt": "hi", "max_tokens": 2, "stop": ["x" * 2000] * 2000}  # the 4 MB
        bad = pool.submit(post, server, "/v1/completions", huge)
        r, took = chat(server)
        assert text_of(r) == reference
        assert took < 2.0, f"a chat took {took:.2f}s beside 4 MB of stop strings (alone: {base:.2f}s)"
        err = error_of(bad.result(), 400)
    assert err["param"] == "stop" and "--max-stop-strings" in err["message"]
    err = error_of(post(server, "/v1/completions", {"prompt": "hi", "stop": ["y" * 1025]}), 400)
    assert err["param"] == "stop" and "--max-stop-string-length" in err["message"]
    err = error_of(post(server, "/v1/completions", {"prompt": "hi", "stop_token_ids": list(range(65))}), 400)
    assert err["param"] == "stop_token_ids"


def test_stop_strings_at_the_cap_do_not_slow_others(server):
    """64 stop strings of 1,024 characters (the defaults' cap) on a long stream: other chats
    keep their speed, and a stop string among them still cuts where it should."""
    rng = random.Random(6)
    noise = ["".join(rng.choice(string.ascii_lowercase + " ") for _ in range(1024)) for _ in range(63)]
    prompt = {"prompt": "The colors of the rainbow are", "max_tokens": 40, "temperature": 0,
              "ignore_eos": True}
    full = post(server, "/v1/completions", prompt).json()["choices"][0]["text"]
    stop = full[20:26]
    reference, base = alone(server)
    long_stream = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True,
                   "stop": noise + ["zzzzqqqq" * 128], "stream": True}
    with cf.ThreadPoolExecutor(2) as pool:
        running = pool.submit(lambda: httpx.post(server.url + "/v1/completions", json=long_stream,
                                                 headers=AUTH, timeout=300))
        time.sleep(1.0)  # the capped request is generating now
        for _ in range(3):
            r, took = chat(server)
            assert text_of(r) == reference
            assert took < 2.0, (f"a chat took {took:.2f}s beside a request with 64 KB of stop "
                                f"strings (alone: {base:.2f}s)")
        cut = post(server, "/v1/completions", {**prompt, "stop": noise + [stop]}).json()["choices"][0]
        assert running.result().status_code == 200
    assert cut["finish_reason"] == "stop" and cut["stop_reason"] == stop
    assert cut["text"] == full[:full.index(stop)]


# --------------------------------------------------------------- defect 7: a huge prompt

def test_huge_prompt_is_refused_before_tokenizing(server):
    big = "hello " * (10_000_000 // 6)  # 10 MB: under the 16 MiB body limit
    with cf.ThreadPoolExecutor(2) as pool:
        t0 = time.monotonic()
        bad = pool.submit(post, server, "/v1/completions", {"prompt": big, "max_tokens": 2})
        tokenized = 0
        while not bad.done() or tokenized == 0:
            t1 = time.monotonic()
            r = post(server, "/tokenize", {"prompt": "hi", "add_special_tokens": False})
            assert r.status_code == 200 and r.json()["count"] == 1
            waited = time.monotonic() - t1
            assert waited < 2.0, f"a 1-token /tokenize waited {waited:.2f}s behind a 10 MB prompt"
            tokenized += 1
        err = error_of(bad.result(), 400)
        took = time.monotonic() - t0
    assert err["param"] == "prompt" and "cannot fit in max_model_len 2048" in err["message"]
    assert took < 5.0, f"the 10 MB prompt took {took:.1f}s to be refused"
    for path, body, param in (("/v1/chat/completions", {"messages": [{"role": "user", "content": big}]},
                               "messages"),
                              ("/tokenize", {"prompt": big}, "prompt")):
        err = error_of(post(server, path, body), 400)
        assert err["param"] == param and "cannot fit" in err["message"]
    # the bound is generous: a prompt of several times max_model_len is still tokenized
    r = post(server, "/tokenize", {"prompt": "hello " * 20_000})
    assert r.status_code == 200 and r.json()["count"] > 2048


# -------------------------------------------- defects 7 and 8: admission counts sequences

def _hold_stream(client: httpx.Client, body: dict):
    """Open a stream and wait for its first event; returns the context to close it with and
    the line iterator (dropping an iterator closes httpx's connection: a client disconnect)."""
    cm = client.stream("POST", "/v1/chat/completions", json={**body, "stream": True})
    r = cm.__enter__()
    assert r.status_code == 200, r.read()
    lines = r.iter_lines()
    assert next(lines).startswith("data: ")
    return cm, lines


def test_admission_counts_sequences_and_tokenize(server):
    long = {**VICTIM, "max_tokens": 1500, "ignore_eos": True}
    clients = [httpx.Client(base_url=server.url, headers=AUTH, timeout=120) for _ in range(4)]
    held = []
    try:
        for c in clients[:3]:  # 3 x n=5 = 15 of the 16 sequences
            held.append(_hold_stream(c, {**long, "n": 5}))
        r = post(server, "/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2})
        err = error_of(r, 429)
        assert r.headers["retry-after"] and "--max-concurrent-requests" in err["message"]
        assert post(server, "/tokenize", {"prompt": "hi"}).status_code == 200  # the 16th
        held.append(_hold_stream(clients[3], long))  # 16 of 16
        r = post(server, "/tokenize", {"prompt": "hi"})
        error_of(r, 429)
        assert r.headers["retry-after"]
    finally:
        for cm, _ in held:
            cm.__exit__(None, None, None)
        for c in clients:
            c.close()
    deadline = time.monotonic() + 10
    while post(server, "/tokenize", {"prompt": "hi"}).status_code == 429:
        assert time.monotonic() < deadline, "closed streams did not give their slots back"
        time.sleep(0.1)
    r = post(server, "/v1/completions", {"prompt": ["a", "b"], "n": 2, "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4


def test_prompt_arrays_are_capped(server):
    reference, base = alone(server)
    with cf.ThreadPoolExecutor(2) as pool:
        bad = pool.submit(post, server, "/v1/completions",
                          {"prompt": ["Hello there"] * 500, "n": 4})  # the 2,000 sequences
        r, took = chat(server)
        assert text_of(r) == reference
        assert took < 2.0, f"a chat took {took:.2f}s beside 500 prompts x 4 (alone: {base:.2f}s)"
        err = error_of(bad.result(), 400)
    assert err["param"] == "prompt" and "2000 sequences" in err["message"]
    err = error_of(post(server, "/v1/completions", {"prompt": ["a"] * 2049, "max_tokens": 1}), 400)
    assert err["param"] == "prompt" and "at most 2048" in err["message"]  # (embeddings: test_embeddings)


@pytest.fixture(scope="module")
def pooling_server(tmp_path_factory):
    """A tiny cross-encoder (one label): /classify, /pooling, /score and /rerank do real work."""
    from tiny_pooling import build_encoder
    path = build_encoder("bert", str(tmp_path_factory.mktemp("reranker")), num_labels=1, seed=1)
    with PagodaServer([path, "--served-model-name", "reranker", *BASE_ARGS[:2],
                       "--max-concurrent-requests", "16", "--max-model-len", "128"]) as s:
        yield s


SCORE = {"text_1": "what keeps the kv cache small",
         "text_2": ["bananas are yellow", "paged attention stores the kv cache in blocks"]}


def scores(server) -> tuple[list[float], float]:
    t0 = time.monotonic()
    r = post(server, "/score", SCORE)
    assert r.status_code == 200, r.text
    return [d["score"] for d in r.json()["data"]], time.monotonic() - t0


@pytest.mark.parametrize("path,body,param", [
    ("/classify", {"input": ["a"] * 2049}, "input"),
    ("/pooling", {"input": [[1]] * 2049}, "input"),
    ("/score", {"text_1": "q", "text_2": ["d"] * 2049}, "text_2"),
    ("/rerank", {"query": "q", "documents": ["d"] * 2049}, "documents"),
])
def test_pooling_lists_are_capped(pooling_server, path, body, param):
    err = error_of(post(pooling_server, path, body), 400)
    assert err["param"] == param and "at most 2048" in err["message"], err


@pytest.mark.parametrize("path,body,param", [
    ("/classify", {"input": ["a"] * 17}, "input"),
    ("/score", {"text_1": "q", "text_2": ["d"] * 17}, "text_2"),
    ("/rerank", {"query": "q", "documents": ["d"] * 17}, "documents"),
])
def test_pooling_inputs_count_toward_admission(pooling_server, path, body, param):
    """Each input (each pair) is one engine request: 17 of them never fit in 16 sequences."""
    err = error_of(post(pooling_server, path, body), 400)
    assert err["param"] == param and "17 sequences" in err["message"], err
    ok = post(pooling_server, path, {k: v[:16] if isinstance(v, list) else v for k, v in body.items()})
    assert ok.status_code == 200, ok.text


def test_pooling_text_is_bounded_and_checked(pooling_server):
    """Huge text is refused before tokenizing (the pair encoding too), lone surrogates are 400s
    naming the field, and a victim /score beside them keeps its scores and its speed."""
    reference, base = scores(pooling_server)
    big = "hello " * (8_000_000 // 6)
    cases = [("/score", {"text_1": big, "text_2": "d"}, "text_1", "cannot fit"),
             ("/score", {"text_1": "q", "text_2": ["d", big]}, "text_2", "cannot fit"),
             ("/rerank", {"query": "q", "documents": [big]}, "documents", "cannot fit"),
             ("/classify", {"input": big}, "input", "cannot fit"),
             ("/score", {"text_1": "\ud800", "text_2": "d"}, "text_1", "surrogate"),
             ("/rerank", {"query": "q", "documents": [{"text": "\udfff"}]}, "documents.0", "surrogate"),
             ("/classify", {"input": ["ok", "a\ud83d"]}, "input", "surrogate")]
    with cf.ThreadPoolExecutor(2) as pool:
        bad = [pool.submit(post_json_text, pooling_server, path, body) for path, body, _, _ in cases]
        got, took = scores(pooling_server)
        assert all(abs(a - b) < 1e-5 for a, b in zip(got, reference)), (got, reference)
        assert took < 2.0, f"a /score took {took:.2f}s beside huge texts (alone: {base:.2f}s)"
        for f, (_, _, param, needle) in zip(bad, cases):
            err = error_of(f.result(), 400)
            assert (err["param"] or "").startswith(param) and needle in err["message"], err


# ---------------------------------------------------------- defect 10: slow request bodies

@pytest.mark.parametrize("head", [
    b"Content-Length: 1000\r\n\r\n{\"prompt\": \"hi\"",          # fewer bytes than announced
    b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"pro\r\n",         # no last chunk
])
def test_a_body_that_never_arrives_gets_408(limits_server, head):
    start = (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer k1\r\n"
             b"Content-Type: application/json\r\n")
    with socket.create_connection((HOST, limits_server.port), timeout=30) as sock, \
            cf.ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        sock.sendall(start + head)
        # the server answers and closes the connection; the time is when it did
        answer = pool.submit(lambda: (read_until_closed(sock, timeout=20), time.monotonic() - t0))
        assert chat(limits_server)[0].status_code == 200  # others are served meanwhile
        data, took = answer.result()
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    assert b'"code":"request_timeout"' in data and b"--request-body-timeout" in data
    assert 1.5 < took < 8, took


def test_connections_are_bounded(limits_server):
    idle = [socket.create_connection((HOST, limits_server.port)) for _ in range(8)]
    try:
        time.sleep(0.3)
        r = httpx.get(limits_server.url + "/health", timeout=10)
        assert r.status_code == 503  # uvicorn's own refusal past --max-connections
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    while httpx.get(limits_server.url + "/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


# ------------------------------------------------------------------- defect 11: small ones

def test_trailing_slash_is_not_redirected_to_the_host_header(server):
    r = httpx.post(server.url + "/v1/chat/completions/", json=VICTIM,
                   headers={**AUTH, "Host": "evil.example"}, follow_redirects=False, timeout=30)
    assert r.status_code == 404 and "location" not in r.headers
    assert error_of(r, 404)["type"] == "not_found_error"


def test_head_health_for_load_balancers(server):
    for path in ("/health", "/ping"):
        r = httpx.head(server.url + path, timeout=30)
        assert r.status_code == 200, (path, r.status_code)


@pytest.mark.parametrize("header,status", [
    ("bearer k1", 200), ("BEARER k1", 200), ("Bearer  k1", 200),
    ("Basic k1", 401), ("bearer k2", 401), ("bearerk1", 401), ("k1", 401),
])
def test_bearer_scheme_is_case_insensitive(server, header, status):
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": header}, timeout=30)
    assert r.status_code == status, r.text


@pytest.mark.parametrize("field,value", [
    ("temperature", True), ("top_p", "0.5"), ("presence_penalty", False), ("stream", "yes"),
    ("logprobs", 1), ("ignore_eos", 0), ("max_tokens", "2"), ("seed", 1.0), ("n", 2.0),
])
def test_numbers_and_booleans_are_strict(server, field, value):
    err = error_of(post(server, "/v1/chat/completions", {**VICTIM, field: value}), 400)
    assert err["param"] == field, err


def test_cors_default_never_allows_credentials(server):
    """--allowed-origins defaults to '*' as in vLLM (README and --help say to set it); with '*'
    a browser is never allowed to send credentials along."""
    r = httpx.options(server.url + "/v1/chat/completions", timeout=30, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in r.headers


# ------------------------------------------- defect 5: SIGTERM with streams still running
# (last: it stops limits_server)

def test_sigterm_ends_running_streams_with_done(limits_server):
    """--shutdown-timeout 2: streams still running then end with finish_reason "abort" and
    [DONE] (not a truncated chunked body); a plain request gets what it has."""
    got: dict[str, object] = {}
    started = threading.Barrier(3)

    def stream(path: str, body: dict) -> None:
        lines = []
        try:
            with httpx.stream("POST", limits_server.url + path, json={**body, "stream": True},
                              headers=AUTH, timeout=120) as r:
                assert r.status_code == 200
                for ln in r.iter_lines():
                    if ln.startswith("data: "):
                        if not lines:
                            started.wait(60)
                        lines.append(ln[6:])
            got[path] = (lines, time.monotonic())
        except Exception as e:  # noqa: BLE001 - e.g. an incomplete chunked read
            got[path] = e

    long = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0}
    threads = [threading.Thread(target=stream, args=("/v1/chat/completions", {**VICTIM, **long})),
               threading.Thread(target=stream, args=("/v1/completions", {"prompt": "Once", **long}))]
    for t in threads:
        t.start()
    with cf.ThreadPoolExecutor(1) as pool:
        started.wait(120)
        plain = pool.submit(post, limits_server, "/v1/chat/completions", {**VICTIM, **long})
        time.sleep(0.5)
        t0 = time.monotonic()
        rc = limits_server.stop()
        for t in threads:
            t.join(60)
        r = plain.result()
    assert rc == 0
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert not isinstance(got[path], Exception), got[path]
        lines, ended = got[path]
        assert lines[-1] == "[DONE]", lines[-3:]
        events = [json.loads(d) for d in lines[:-1]]
        finals = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]
        assert finals == ["abort"], finals
        assert 1.5 < ended - t0 < 8, ended - t0  # at --shutdown-timeout, not cut earlier or hung
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "abort"
