"""`pagoda serve --engine-core process`: the engine core in a process of its own behind ZMQ.
Outputs equal the in-process engine's, and if the engine-core process dies the API server
notices: /health answers 503, requests in flight end with an OpenAI-shaped 500 or an SSE error
event (no hang), and the server exits non-zero so Docker/compose restarts it."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import time

import httpx
import pytest

from server_utils import PagodaServer, engine_core_pid

pytestmark = pytest.mark.slow

CHAT = {"messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
        "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def reference(bundled_llm):
    from pagoda import SamplingParams
    return bundled_llm.chat(CHAT["messages"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].text


def test_outputs_equal_the_offline_engine(reference):
    with PagodaServer(["--engine-core", "process", "--max-model-len", "2048"]) as s:
        assert engine_core_pid(s.proc.pid) > 0
        r = httpx.post(s.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 24}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == reference
        streamed = ""
        with httpx.stream("POST", s.url + "/v1/chat/completions",
                          json={**CHAT, "max_tokens": 24, "stream": True}, timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    ch = json.loads(line[6:])["choices"]
                    streamed += (ch[0]["delta"].get("content") or "") if ch else ""
        assert streamed == reference


def test_killing_the_engine_core_fails_requests_and_exits_non_zero():
    s = PagodaServer(["--engine-core", "process", "--max-model-len", "2048", "--disable-log-stats"])
    s.start()
    try:
        core = engine_core_pid(s.proc.pid)

        def stream():
            events = []
            with httpx.stream("POST", s.url + "/v1/chat/completions",
                              json={**CHAT, "max_tokens": 1500, "stream": True}, timeout=60) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
            return events

        def plain():
            return httpx.post(s.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 1500}, timeout=60)

        with cf.ThreadPoolExecutor(2) as pool:
            streamed, blocking = pool.submit(stream), pool.submit(plain)
            time.sleep(2.0)  # both are generating now
            os.kill(core, signal.SIGKILL)
            t0 = time.monotonic()
            health = []
            while time.monotonic() - t0 < 5 and s.proc.poll() is None:
                try:
                    health.append(httpx.get(s.url + "/health", timeout=2).status_code)
                except httpx.TransportError:
                    break
                if 503 in health:
                    break
                time.sleep(0.05)
            events = streamed.result(timeout=15)
            r = blocking.result(timeout=15)
        assert 503 in health, health
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["code"] == "engine_dead" and err["type"] == "server_error"
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_dead"
        s.proc.wait(20)
        assert s.proc.returncode not in (0, None)
        assert "engine core died" in s.log()
    finally:
        s.stop(signal.SIGKILL)
