"""End-to-end: API key, CORS, config file + env, admission limit (429), body limit (413), and a
graceful SIGTERM drain, against one `pagoda serve` configured through a YAML file and the env."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import pytest

from server_utils import PagodaServer

pytestmark = pytest.mark.slow

KEY = "test-secret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "Tell me a long story about a dragon."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("cfg") / "serve.yaml"
    cfg.write_text("served-model-name: [alpha, beta]\n"
                   "max_concurrent_requests: 2\n"
                   "max-model-len: 4096\n"
                   "max-request-body-size: 64KiB\n"
                   "disable-log-stats: true\n")
    # the command line overrides the file: max-model-len ends up 1024
    with PagodaServer(["--config", str(cfg), "--max-model-len", "1024", "--root-path", "/llm"],
                      env={"PAGODA_API_KEY": KEY}) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def test_config_file_env_and_cli_precedence(http):
    models = http.get("/v1/models", headers=AUTH).json()["data"]
    assert [m["id"] for m in models] == ["alpha", "beta"]
    assert {m["max_model_len"] for m in models} == {1024}


def test_root_path_behind_a_proxy(http):
    """--root-path /llm: works whether the proxy strips the prefix or forwards it."""
    for path in ("/v1/models", "/llm/v1/models"):
        assert http.get(path, headers=AUTH).status_code == 200, path
    assert http.get("/llm/health").status_code == 200
    assert http.get("/llm/v1/models").status_code == 401
    assert http.get("/openapi.json", headers=AUTH).json()["servers"] == [{"url": "/llm"}]


def test_every_route_but_health_and_ping_needs_the_key(http):
    schema = http.get("/openapi.json", headers=AUTH).json()
    routes = [(method.upper(), path.replace("{model_id}", "alpha"))
              for path, ops in schema["paths"].items() for method in ops]
    routes += [("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json"), ("GET", "/no/such/route"),
               ("POST", "/v1/embeddings")]
    assert len(routes) > 12
    for method, path in routes:
        if path in ("/health", "/ping"):
            assert http.request(method, path).status_code == 200, (method, path)
            continue
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = http.request(method, path, headers=headers, json={})
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"


def test_sdk_with_key_and_served_names(server):
    client = server.openai_client(api_key=KEY)
    r = client.chat.completions.create(model="beta", messages=CHAT, max_tokens=3)
    assert r.model == "alpha"  # responses report the first served name
    with pytest.raises(openai.AuthenticationError):
        server.openai_client(api_key="nope").models.list()


def test_cors_preflight_needs_no_key(http):
    r = http.options("/v1/chat/completions", headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] in ("*", "http://example.com")


def test_body_over_limit_is_413(http):
    big = {"model": "alpha", "prompt": "x" * (100 << 10)}
    r = http.post("/v1/completions", json=big, headers=AUTH)
    assert r.status_code == 413
    assert "--max-request-body-size" in r.json()["error"]["message"]
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=AUTH).status_code == 200


def test_admission_limit_is_429_with_retry_after(server, http):
    body = {"messages": CHAT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    opened = [threading.Event(), threading.Event()]
    release = threading.Event()

    def hold(i: int):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            with c.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        opened[i].set()
                        release.wait(60)
                        break

    holders = [threading.Thread(target=hold, args=(i,)) for i in range(2)]
    for t in holders:
        t.start()
    try:
        assert all(e.wait(60) for e in opened)
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=AUTH)
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            server.openai_client(api_key=KEY).completions.create(model="alpha", prompt="hi", max_tokens=1)
        assert http.get("/v1/models", headers=AUTH).status_code == 200  # only completions count
    finally:
        release.set()
        for t in holders:
            t.join(60)
    # the dropped streams free their slots as soon as the server notices the disconnects
    deadline = time.monotonic() + 15
    while True:
        status = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=AUTH).status_code
        if status != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200


def test_sigterm_drains_in_flight_stream_and_exits_0(server):
    """Runs last: stops the module's server."""
    body = {"messages": CHAT, "max_tokens": 40, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    payloads = []
    with httpx.Client(base_url=server.url, timeout=120) as c:
        with c.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                payloads.append(line[6:])
                if len(payloads) == 2:
                    server.proc.send_signal(signal.SIGTERM)
    assert payloads[-1] == "[DONE]"
    usage = json.loads(payloads[-2])["usage"]
    assert usage["completion_tokens"] == 40  # the in-flight request finished in full
    assert server.proc.wait(60) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=2)
