"""`pagoda bench serve` against a live `pagoda serve` (bundled model) on 127.0.0.1."""
from __future__ import annotations

import json
import socket
import sys

import numpy as np
import pytest
from openai import OpenAI

from pagoda.bench.server_process import ServerProcess
from pagoda.entrypoints.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "512", "--disable-log-requests"]
    with ServerProcess(cmd, f"http://127.0.0.1:{port}", str(log), startup_timeout_s=300) as srv:
        yield srv.url


def test_twenty_requests_no_errors(server, tmp_path):
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--base-url", server, "--endpoint", "/v1/chat/completions",
                 "--num-prompts", "20", "--max-tokens", "8", "--ignore-eos", "--max-concurrency", "5",
                 "--disable-tqdm", "--output-json", str(out)]) == 0
    res = json.loads(out.read_text())
    s, recs = res["summary"], res["requests"]
    assert (s["requests_sent"], s["completed"], s["errors"]) == (20, 20, 0)
    # --ignore-eos reached the engine: every request produced all 8 tokens, as the server counted them
    assert all(r["output_tokens"] == 8 and r["tokens_from_usage"] for r in recs)
    assert all(r["prompt_tokens"] > 0 for r in recs)
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        vals = [r[key] for r in recs]
        for p in (50, 90, 99):
            assert s[key][f"p{p}"] == pytest.approx(np.percentile(vals, p))
    itl = [v for r in recs for v in r["itl_ms"]]
    assert s["itl_ms"]["p50"] == pytest.approx(np.percentile(itl, 50))
    assert all(r["ttft_ms"] < r["e2e_ms"] for r in recs)


def test_token_count_matches_the_sdk(server):
    """The bench's count for one prompt equals what the official SDK sees from the same server."""
    client = OpenAI(base_url=server + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    stream = client.completions.create(model=model, prompt="Tell me about rivers.", max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    usage = [c.usage for c in stream if c.usage][-1]
    assert usage.completion_tokens == 12
    from pagoda.bench.serve import LoadConfig, run_load
    import asyncio
    cfg = LoadConfig(base_url=server, endpoint="/v1/completions", model=model, max_tokens=12, ignore_eos=True)
    (rec,), _ = asyncio.run(run_load(cfg, ["Tell me about rivers."], progress=False))
    assert rec.error is None and rec.output_tokens == usage.completion_tokens
    assert rec.prompt_tokens == usage.prompt_tokens
