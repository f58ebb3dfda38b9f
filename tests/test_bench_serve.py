"""`pagoda bench serve` against a fake OpenAI streaming server whose delays are known.

The fake sleeps a fixed time before the first token and between tokens, so the client-side
TTFT / ITL / TPOT the benchmark reports can be checked against what the server did."""
from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time

import numpy as np
import pytest
from aiohttp import web

from pagoda.bench.serve import arrival_gaps
from pagoda.entrypoints.cli import main

pytestmark = pytest.mark.timeout(120)


class FakeServer:
    """An OpenAI-shaped streaming server on 127.0.0.1 in its own thread and event loop."""

    def __init__(self, ttft_s=0.25, itl_s=0.04, fail_every=0, usage=True, cut_after=None):
        self.ttft_s, self.itl_s, self.fail_every, self.usage = ttft_s, itl_s, fail_every, usage
        self.cut_after = cut_after  # end every stream after this many tokens, with no finish_reason
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.in_flight = self.peak = self.count = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def _complete(self, request):
        body = await request.json()
        self.count += 1
        n = self.count
        self.bodies.append(body)
        self.auth.append(request.headers.get("Authorization"))
        if self.fail_every and n % self.fail_every == 0:
            return web.json_response({"error": {"message": "boom", "type": "server_error"}}, status=500)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            chat = request.path.endswith("/chat/completions")
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)

            async def send(obj):
                await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

            if chat:  # a role-only first chunk carries no text and must not count as the first token
                await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            await asyncio.sleep(self.ttft_s)
            n_out = body["max_tokens"]
            for i in range(min(n_out, self.cut_after or n_out)):
                if i:
                    await asyncio.sleep(self.itl_s)
                piece = f" tok{i}"
                choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                choice["finish_reason"] = "length" if i == n_out - 1 else None
                await send({"choices": [choice]})
            if self.usage and body.get("stream_options", {}).get("include_usage"):
                await send({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": body["max_tokens"],
                                                     "total_tokens": 7 + body["max_tokens"]}})
            await resp.write(b"data: [DONE]\n\n")
            return resp
        finally:
            self.in_flight -= 1

    def _serve(self):
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/chat/completions", self._complete)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


def bench(tmp_path, server, *extra) -> dict:
    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--base-url", server.url, "--output-json", str(out), "--disable-tqdm",
               *map(str, extra)])
    assert rc == 0
    return json.loads(out.read_text())


def test_timings_match_the_servers_delays(tmp_path, capsys):
    with FakeServer(ttft_s=0.25, itl_s=0.04) as srv:
        res = bench(tmp_path, srv, "--endpoint", "/v1/chat/completions", "--num-prompts", 4,
                    "--max-concurrency", 2, "--max-tokens", 6, "--ignore-eos", "--api-key", "sk-test",
                    "--plot", tmp_path / "serve.png")
    recs, s = res["requests"], res["summary"]
    assert s["completed"] == 4 and s["errors"] == 0
    for r in recs:
        assert 250 <= r["ttft_ms"] < 450, r["ttft_ms"]
        assert r["output_tokens"] == 6 and r["tokens_from_usage"]
        assert len(r["itl_ms"]) == 5
        assert 40 <= statistics.median(r["itl_ms"]) < 90, r["itl_ms"]
        assert sum(r["itl_ms"]) >= 5 * 40 - 5  # the gaps add up to the server's sleeps
        assert 40 <= r["tpot_ms"] < 90, r["tpot_ms"]
        assert r["e2e_ms"] >= r["ttft_ms"] + 5 * 40 - 5
        assert r["prompt_tokens"] == 7 and r["finish_reason"] == "length"
    # the request as the server saw it: auto-detected model, streaming with usage, ignore_eos, key
    assert {b["model"] for b in srv.bodies} == {"fake-model"}
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True} for b in srv.bodies)
    assert all(b["ignore_eos"] is True and b["max_tokens"] == 6 and b["messages"][0]["role"] == "user"
               for b in srv.bodies)
    assert set(srv.auth) == {"Bearer sk-test"}
    # the summary's percentiles are those of the per-request records
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        vals = [r[key] for r in recs]
        assert s[key]["mean"] == pytest.approx(np.mean(vals))
        for p in (50, 90, 99):
            assert s[key][f"p{p}"] == pytest.approx(np.percentile(vals, p))
    itls = [v for r in recs for v in r["itl_ms"]]
    assert s["itl_ms"]["p99"] == pytest.approx(np.percentile(itls, 99))
    assert s["output_tokens"] == 24
    assert s["output_throughput"] == pytest.approx(24 / s["duration_s"])
    assert s["request_throughput"] == pytest.approx(4 / s["duration_s"])
    assert (tmp_path / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "TTFT" in printed and "Output token throughput" in printed


def test_server_errors_are_counted_not_timed(tmp_path):
    with FakeServer(ttft_s=0.02, itl_s=0.01, fail_every=3) as srv:
        res = bench(tmp_path, srv, "--num-prompts", 9, "--max-tokens", 3, "--model", "m")
    s = res["summary"]
    assert (s["requests_sent"], s["completed"], s["errors"]) == (9, 6, 3)
    failed = [r for r in res["requests"] if r["error"]]
    assert all(r["error"].startswith("HTTP 500") and r["ttft_ms"] is None for r in failed)
    assert s["output_tokens"] == 6 * 3


def test_streams_cut_short_are_errors(tmp_path):
    with FakeServer(ttft_s=0.02, itl_s=0.01, cut_after=2, usage=False) as srv:
        res = bench(tmp_path, srv, "--num-prompts", 2, "--max-tokens", 5)
    s = res["summary"]
    assert (s["completed"], s["errors"]) == (0, 2)
    assert all("without a finish_reason after 2 text chunks" in r["error"] for r in res["requests"])


def test_tokens_counted_from_chunks_without_usage(tmp_path):
    with FakeServer(ttft_s=0.02, itl_s=0.01, usage=False) as srv:
        res = bench(tmp_path, srv, "--num-prompts", 3, "--max-tokens", 5, "--workload", "random",
                    "--input-len", 12)
    for r in res["requests"]:
        assert r["output_tokens"] == 5 and not r["tokens_from_usage"] and r["prompt_tokens"] is None
    assert [len(b["prompt"].split()) for b in srv.bodies] == [12, 12, 12]
    assert res["summary"]["prompt_tokens"] is None


def test_max_concurrency_caps_requests_in_flight(tmp_path):
    with FakeServer(ttft_s=0.1, itl_s=0.01) as srv:
        bench(tmp_path, srv, "--num-prompts", 6, "--max-tokens", 2, "--max-concurrency", 2)
        assert srv.peak == 2
        bench(tmp_path, srv, "--num-prompts", 6, "--max-tokens", 2)
        assert srv.peak == 6  # unlimited at rate inf: all six at once


def test_duration_stops_sending(tmp_path):
    with FakeServer(ttft_s=0.01, itl_s=0.01) as srv:
        t0 = time.monotonic()
        res = bench(tmp_path, srv, "--num-prompts", 1000, "--request-rate", 20, "--duration", 0.5,
                    "--max-tokens", 2)
        wall = time.monotonic() - t0
    assert 2 <= res["summary"]["requests_sent"] <= 30
    assert res["summary"]["requests_sent"] == srv.count
    assert all(r["start_s"] < 0.5 for r in res["requests"])
    assert wall < 10


def test_poisson_arrivals(tmp_path):
    gaps = arrival_gaps(4000, 8.0, seed=1)
    assert statistics.mean(gaps) == pytest.approx(1 / 8, rel=0.06)
    assert statistics.stdev(gaps) == pytest.approx(1 / 8, rel=0.1)  # exponential: sd == mean
    assert arrival_gaps(5, float("inf"), 0) == [0.0] * 5
    # requests leave at the cumulative gaps
    with FakeServer(ttft_s=0.01, itl_s=0.01) as srv:
        res = bench(tmp_path, srv, "--num-prompts", 6, "--request-rate", 10, "--seed", 3, "--max-tokens", 2)
    expected = np.cumsum(arrival_gaps(6, 10.0, seed=3))
    starts = [r["start_s"] for r in res["requests"]]
    assert starts == sorted(starts)
    assert np.allclose(starts, expected, atol=0.08)


def test_goodput_applies_the_slos(tmp_path):
    with FakeServer(ttft_s=0.15, itl_s=0.02) as srv:
        tight = bench(tmp_path, srv, "--num-prompts", 3, "--max-tokens", 3, "--slo-ttft-ms", 100)["summary"]
        loose = bench(tmp_path, srv, "--num-prompts", 3, "--max-tokens", 3, "--slo-ttft-ms", 2000,
                      "--slo-tpot-ms", 1000)["summary"]
        tpot = bench(tmp_path, srv, "--num-prompts", 3, "--max-tokens", 3, "--slo-tpot-ms", 5)["summary"]
        none = bench(tmp_path, srv, "--num-prompts", 1, "--max-tokens", 3)["summary"]
    assert tight["goodput_requests"] == 0 and tight["goodput"] == 0
    assert loose["goodput_requests"] == 3 and loose["goodput"] == pytest.approx(3 / loose["duration_s"])
    assert tpot["goodput_requests"] == 0
    assert "goodput" not in none


@pytest.mark.parametrize("flags, message", [
    (["--extra-body", "[1]"], "--extra-body: must be a JSON object"),
    (["--extra-body", "{nope"], "--extra-body: not valid JSON"),
    (["--num-prompts", "0"], "--num-prompts: must be >= 1"),
    (["--base-url", "127.0.0.1:9"], "--base-url: expected http://HOST:PORT"),
])
def test_bad_flags_get_one_line(flags, message, capsys):
    assert main(["bench", "serve", "--model", "m", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bad_request_rate_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "serve", "--request-rate", "0"])
    assert e.value.code == 2
    assert "--request-rate" in capsys.readouterr().err


def test_unreachable_server_counts_errors(tmp_path):
    with FakeServer() as srv:
        url = srv.url
    # the server is gone: every request fails to connect, and the run still ends with a report
    out = tmp_path / "r.json"
    assert main(["bench", "serve", "--base-url", url, "--model", "m", "--num-prompts", "3",
                 "--disable-tqdm", "--output-json", str(out)]) == 0
    s = json.loads(out.read_text())["summary"]
    assert (s["completed"], s["errors"]) == (0, 3)
