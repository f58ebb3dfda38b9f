"""`pagoda serve --api-server-count 2`: two API server processes in front of one engine core, on
one port. Every request is answered (the same text as one server gives), /metrics from either
process counts all of them, and SIGTERM drains both and exits 0."""
from __future__ import annotations

import concurrent.futures as cf
import signal

import httpx
import pytest

from server_utils import PagodaServer, child_pids, metric

pytestmark = pytest.mark.slow

CHAT = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "temperature": 0}


def test_two_api_servers_one_engine(bundled_llm):
    from pagoda import SamplingParams
    expect = bundled_llm.chat(CHAT["messages"], SamplingParams(temperature=0, max_tokens=8),
                              use_tqdm=False)[0].outputs[0].text
    s = PagodaServer(["--api-server-count", "2", "--max-model-len", "2048", "--disable-log-stats"])
    s.start()
    try:
        kids = child_pids(s.proc.pid)
        api = [k for k in kids if b"spawn_main" in open(f"/proc/{k}/cmdline", "rb").read()]
        assert len(api) == 3, kids  # the engine core and two API servers

        def ask(_):  # a new connection each: the kernel spreads them over both processes
            with httpx.Client(timeout=120) as c:
                r = c.post(s.url + "/v1/chat/completions", json=CHAT)
                return r.status_code, r.json()["choices"][0]["message"]["content"]
        with cf.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(16)))
        assert answers == [(200, expect)] * 16
        totals = [metric(s.metrics(), "pagoda:request_success_total", finished_reason="length")
                  + metric(s.metrics(), "pagoda:request_success_total", finished_reason="stop")
                  for _ in range(6)]
        assert set(totals) == {16.0}, totals  # whichever process answers /metrics counts all
        assert s.stop(signal.SIGTERM) == 0
    finally:
        s.stop(signal.SIGKILL)
