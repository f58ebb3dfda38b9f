"""The shipped deployment configs in front of a live `pagoda serve`, everything on 127.0.0.1.

A real nginx (Debian's) runs the shipped nginx templates, rendered as the nginx image renders
them but with loopback addresses; a real Prometheus runs the shipped prometheus.yml and alert
rules with the pagoda job pointed at the live server, which has an API key (it guards /metrics
too), and a key file holding it, as compose provides. Checked: a streamed chat arrives through
nginx chunk by chunk; /metrics through nginx is served to loopback and refused elsewhere, and
needs the key; Prometheus scrapes pagoda with the key (target up, rules evaluate) while the same
job without the key is refused; with no key set anywhere, compose's placeholder key file still
scrapes a keyless server; every metric the Grafana dashboard reads is on the live /metrics and
every dashboard query runs in that Prometheus; the image's and compose's healthcheck commands
pass against the server and fail without it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pagoda.gpu_monitor import GPU_METRIC_NAMES, gpu_collector_available
from test_deploy_static import (DEPLOY, concrete, dashboard_queries, healthcheck_command,
                                metric_names, nginx_bin, pagoda_job, prometheus_key_from_compose,
                                render_prometheus_config, write_nginx_config)

pytestmark = pytest.mark.slow

API_KEY = "sk-deploy-e2e"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
START_TIMEOUT_S = 240  # loading the bundled model on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None,
               log: Path | None = None, interval: float = 0.25):
    """Poll check() until it returns a truthy value, the process dies, or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(interval)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    state = f"exited with {proc.returncode}" if proc is not None and proc.poll() is not None else "timed out"
    raise AssertionError(f"{what}: {state}\n{tail}")


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM this process's own group, then SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def get(url: str, **kw) -> httpx.Response:
    return httpx.get(url, timeout=10, **kw)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deploy_e2e")


@contextlib.contextmanager
def running_pagoda(log: Path, *flags: str):
    """`pagoda serve` (bundled model, CPU) on a free loopback port, no PAGODA_* from outside."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGODA_")}
    proc = start([sys.executable, "-m", "pagoda.entrypoints.cli", "serve", "--host", "127.0.0.1",
                  "--port", str(port), "--max-model-len", "1024", "--device", "cpu", *flags],
                 log, env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: get(base + "/health").status_code == 200, START_TIMEOUT_S,
                   "pagoda serve", proc, log, interval=0.5)
        yield {"port": port, "base": base}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def server(work):
    with running_pagoda(work / "pagoda.log", "--api-key", API_KEY) as s:
        s["model"] = get(s["base"] + "/v1/models", headers=AUTH).json()["data"][0]["id"]
        yield s


# An operator who turns gzip on for everything, text/event-stream included: the shipped locations
# must keep streams flowing anyway.
GZIP_EVERYTHING = "gzip on; gzip_min_length 1; gzip_types text/event-stream application/json;"


@contextlib.contextmanager
def running_nginx(root: Path, upstream_port: int, edit=None):
    """nginx with the shipped templates rendered for loopback; edit(rendered locations) -> text
    lets a test change them."""
    binary = nginx_bin()
    if not binary:
        pytest.skip("nginx not installed (scripts/ci_system_deps.sh installs it)")
    port = free_port()
    main = write_nginx_config(root, upstream=f"127.0.0.1:{upstream_port}",
                              listen=f"127.0.0.1:{port}", http_extra=GZIP_EVERYTHING)
    if edit:
        locations = root / "conf.d" / "pagoda-locations.inc"
        locations.write_text(edit(locations.read_text()))
    log = root / "stdout.log"  # the shipped config writes its access log to stdout
    proc = start([binary, "-p", str(root), "-c", str(main), "-e", "stderr", "-g", "daemon off;"], log)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: get(base + "/nginx-health").status_code == 200, 15, "nginx", proc, log)
        yield {"base": base, "log": log}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def nginx(work, server):
    with running_nginx(work / "nginx", server["port"]) as n:
        yield n


WITHOUT_KEY = "pagoda-without-key"


@contextlib.contextmanager
def running_prometheus(root: Path, upstream_port: int, key: str, control_job: bool = False):
    """Prometheus with the shipped config and rules, the pagoda job pointed at the live server and
    reading key from its credentials file. control_job adds a copy of the pagoda job that sends
    no key, to show that the key is what gets the scrape through."""
    binary = shutil.which("prometheus")
    if not binary:
        pytest.skip("prometheus not installed (scripts/ci_system_deps.sh installs it)")
    root.mkdir(parents=True)
    key_file = root / "pagoda_api_key"
    key_file.write_text(key)
    cfg = render_prometheus_config(f"127.0.0.1:{upstream_port}", key_file)
    if control_job:
        job = {k: v for k, v in pagoda_job(cfg).items() if k != "authorization"}
        cfg["scrape_configs"].append({**job, "job_name": WITHOUT_KEY})
    config = root / "prometheus.yml"
    config.write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = root / "prometheus.log"
    proc = start([binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'tsdb'}",
                  f"--web.listen-address=127.0.0.1:{port}"], log)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: get(base + "/-/ready").status_code == 200, 30, "prometheus", proc, log)
        yield {"base": base}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def prometheus(work, server):
    with running_prometheus(work / "prometheus", server["port"], API_KEY, control_job=True) as p:
        yield p


def scrape_target(prometheus_base: str, job: str, health: str) -> dict:
    """The job's single target once its last scrape has the given health."""
    def find():
        targets = get(prometheus_base + "/api/v1/targets").json()["data"]["activeTargets"]
        mine = [t for t in targets if t["labels"]["job"] == job]
        return mine if mine and mine[0]["health"] == health else None

    [target] = wait_until(find, 30, f"{job} target {health} in Prometheus")
    return target


def stream_chat(base: str, model: str, max_tokens: int = 48) -> tuple[httpx.Response, list[float], float]:
    """Stream a chat completion; returns the response, each content chunk's arrival time, and
    when the request was sent (time.monotonic())."""
    body = {"model": model, "messages": [{"role": "user", "content": "Count from one to fifty."}],
            "stream": True, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    arrivals: list[float] = []
    sent = time.monotonic()
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers=AUTH,
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        done = False
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.monotonic())
        assert done
    return r, arrivals, sent


def incremental(arrivals: list[float], sent: float) -> bool:
    """The first token reached the client early, not with the last, and the rest came over time
    (no single moment holds most of the chunks)."""
    first, total = arrivals[0] - sent, arrivals[-1] - sent
    bursts = 1 + sum(1 for a, b in zip(arrivals, arrivals[1:]) if b - a > 0.002)  # a buffer: ~µs
    return first < 0.5 * total and bursts >= len(arrivals) // 3


def test_streaming_through_nginx_arrives_incrementally(server, nginx):
    # 128 tokens: on a fast CPU a token takes ~5 ms, so the stream must outlast the first token
    r, arrivals, sent = stream_chat(nginx["base"], server["model"], max_tokens=128)
    assert r.headers["content-type"].startswith("text/event-stream")
    assert "content-encoding" not in r.headers  # the global gzip stays off for the API
    assert len(arrivals) >= 24, len(arrivals)
    assert incremental(arrivals, sent), [round(a - sent, 3) for a in arrivals]
    # nginx handed the request to pagoda with its request id, and logged where it went
    # (nginx writes the line once the request is finalized, a moment after the last byte)
    request_id = r.headers["x-request-id"]
    line = wait_until(lambda: next((ln for ln in nginx["log"].read_text().splitlines()
                                    if f"req_id={request_id}" in ln), None), 10, "access log line")
    assert f"upstream=127.0.0.1:{server['port']}" in line and " 200 " in line


def test_measurement_detects_a_buffering_proxy(server, work):
    """Control: the same check fails behind a location that buffers (and so gzips) the stream."""
    def buffering(text: str) -> str:
        assert text.count("proxy_buffering off;") == 1 and text.count("gzip off;") == 1
        return (text.replace("proxy_buffering off;", "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;")
                .replace("gzip off;", ""))

    with running_nginx(work / "nginx-buffering", server["port"], edit=buffering) as n:
        r, arrivals, sent = stream_chat(n["base"], server["model"], max_tokens=32)
    assert r.headers.get("content-encoding") == "gzip"
    assert len(arrivals) >= 16 and not incremental(arrivals, sent)


def test_metrics_and_health_through_nginx(server, nginx):
    r = get(nginx["base"] + "/metrics", headers=AUTH)
    assert r.status_code == 200
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert "pagoda:num_requests_running" in names
    # the shipped config serves /metrics to loopback and private networks only
    outside = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=10)
    with outside:
        assert outside.get(nginx["base"] + "/metrics").status_code == 403
        assert outside.get(nginx["base"] + "/health").status_code == 200
    assert get(nginx["base"] + "/health").status_code == 200
    for path in ("/v1/models", "/metrics"):  # the key guards /metrics too, through nginx as well
        unauthorized = get(nginx["base"] + path)
        assert unauthorized.status_code == 401, path
        assert unauthorized.json()["error"]["code"] == "invalid_api_key"


def test_prometheus_scrapes_pagoda(server, prometheus):
    # a scrape without the key is refused, by the server and so in Prometheus
    assert get(server["base"] + "/metrics").status_code == 401
    refused = scrape_target(prometheus["base"], WITHOUT_KEY, "down")
    assert "401" in refused["lastError"], refused["lastError"]
    # the shipped job sends the key from its credentials file
    target = scrape_target(prometheus["base"], "pagoda", "up")
    assert target["scrapeUrl"] == f"{server['base']}/metrics"
    assert target["lastError"] == ""
    up = get(prometheus["base"] + "/api/v1/query", params={"query": 'up{job="pagoda"}'}).json()
    assert [s["value"][1] for s in up["data"]["result"]] == ["1"]

    def rules_evaluated():
        groups = get(prometheus["base"] + "/api/v1/rules").json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        never = "0001-01-01"  # Prometheus's zero time: not evaluated yet
        return rules if rules and not any(r["lastEvaluation"].startswith(never) for r in rules) else None

    rules = wait_until(rules_evaluated, 20, "alert rules evaluated")
    assert {r["name"] for r in rules} >= {"PagodaReplicaDown", "PagodaRequestsQueueing"}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    assert not [r for r in rules if r["state"] != "inactive"]  # a healthy idle server alerts nothing


def live_metric_names(base: str) -> set[str]:
    text = get(base + "/metrics", headers=AUTH).text
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_dashboard_metrics_are_exported_live(server, nginx):
    stream_chat(nginx["base"], server["model"], max_tokens=8)  # every histogram has observations
    live = live_metric_names(server["base"])
    gpu_here = gpu_collector_available()
    for expr in dashboard_queries():
        for name in metric_names(expr) - {"up"}:  # `up` is Prometheus's own, checked below
            if name in GPU_METRIC_NAMES and not gpu_here:
                continue  # no GPU on this machine; test_deploy_gpu_monitor.py checks these names
            assert name in live, f"dashboard reads {name}, which pagoda does not export ({expr})"


def test_dashboard_queries_run_in_prometheus(server, nginx, prometheus):
    stream_chat(nginx["base"], server["model"], max_tokens=8)
    gpu_here = gpu_collector_available()
    exprs = dashboard_queries()

    def results():
        out = {}
        for expr in exprs:
            r = get(prometheus["base"] + "/api/v1/query", params={"query": concrete(expr, "1m")})
            assert r.status_code == 200 and r.json()["status"] == "success", (expr, r.text)
            out[expr] = r.json()["data"]["result"]
        gpu = {e for e in exprs if metric_names(e) <= set(GPU_METRIC_NAMES)}
        ready = all(out[e] for e in exprs if e not in gpu or gpu_here)
        return (out, gpu) if ready else None

    out, gpu = wait_until(results, 30, "every dashboard query returns data", interval=1)
    assert gpu  # the GPU panels' queries, empty here unless this machine has a GPU
    if not gpu_here:
        assert not any(out[e] for e in gpu)


def test_prometheus_scrapes_a_server_without_key(work):
    """No PAGODA_API_KEY: compose fills Prometheus's key file with a placeholder, which a server
    without --api-key ignores."""
    placeholder = prometheus_key_from_compose()
    with running_pagoda(work / "pagoda-keyless.log") as keyless:
        assert get(keyless["base"] + "/metrics").status_code == 200
        with running_prometheus(work / "prometheus-keyless", keyless["port"], placeholder) as p:
            target = scrape_target(p["base"], "pagoda", "up")
    assert target["scrapeUrl"] == f"{keyless['base']}/metrics" and target["lastError"] == ""


def compose_healthcheck_command() -> list[str]:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    test = compose["services"]["pagoda"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    return test[1:]


@pytest.mark.parametrize("source", ["Dockerfile", "compose.yaml"])
def test_healthcheck_commands(server, source):
    """The exact healthcheck command, run as the container would (python from the venv)."""
    cmd = healthcheck_command() if source == "Dockerfile" else compose_healthcheck_command()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    ok = subprocess.run(cmd, env={**env, "PAGODA_PORT": str(server["port"])}, timeout=30)
    assert ok.returncode == 0
    down = subprocess.run(cmd, env={**env, "PAGODA_PORT": str(free_port())}, capture_output=True,
                          timeout=30)
    assert down.returncode != 0
