"""Start-up time on the bundled GGUF: pagoda's LLM() and `pagoda serve`, warm and cold, beside
llama.cpp's server on the same file, in one run.

Rows (each a fresh process, run --repeat times; the table shows the median and the range):
  LLM() warm        `from pagoda import LLM; LLM()` with the converted tokenizer/config and the
                    C kernels already in PAGODA_CACHE_DIR; import and constructor timed apart
  LLM() cold        the same with an empty PAGODA_CACHE_DIR: the GGUF's tokenizer/config are
                    converted and the C kernels compiled during the run
  pagoda serve warm / cold   launch -> first 200 from GET /health
  make serve        (when the checkout has a set-up venv: .venv or $PAGODA_VENV) launch -> /health
  llama.cpp server  llama-cpp-python's server, launch -> first 200 from GET /v1/models (it keeps
                    no cache, so it has one row)
"Cold" means pagoda's own cache; the OS page cache keeps the files read by earlier rows (dropping
it needs root and slows everyone else on a shared machine). pagoda's one-line breakdown of each
start ("startup 2.1s: config ..., tokenizer ...") is kept in the JSON beside the times.

llama.cpp comes from PyPI in its own venv (see c1_llamacpp_vs_pagoda.py):
    python -m venv /work/llamacpp-venv && /work/llamacpp-venv/bin/pip install "llama-cpp-python[server]"

usage: python benchmarks/startup.py [--repeat 3] [--llamacpp-python PY] [--skip-llamacpp]
                                    [--only "LLM() warm" ...] [--output-json benchmarks/results/startup.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from c1_llamacpp_vs_pagoda import bundled_gguf, llamacpp_server_cmd, platform_cpu  # noqa: E402

# a child process that times its own import and LLM() and logs pagoda's breakdown line
_LLM_CHILD = r"""
import json, logging, sys, time
t0 = time.perf_counter()
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from pagoda import LLM
t1 = time.perf_counter()
LLM()
t2 = time.perf_counter()
from pagoda.startup import process_age
print(json.dumps({"import_s": t1 - t0, "llm_s": t2 - t1, "process_s": process_age()}))
"""
_BREAKDOWN = re.compile(r"(startup [0-9.]+s: .*)")


def _breakdown(text: str) -> str | None:
    m = _BREAKDOWN.findall(text)
    return m[-1].strip() if m else None


def run_llm(env: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", _LLM_CHILD], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"LLM() child failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["seconds"] = res["llm_s"]
    res["breakdown"] = _breakdown(r.stderr)
    return res


def _wait_port_free(port: int, timeout_s: float = 60) -> None:
    """A server still draining on the port would answer for the next one and fake its start."""
    import socket
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"port {port} is still in use after {timeout_s:.0f} s; pass another --port")


def run_server(cmd: list[str], port: int, ready_path: str, env: dict, log_dir: str, name: str) -> dict:
    from pagoda.bench.server_process import ServerProcess
    _wait_port_free(port)
    log = os.path.join(log_dir, f"{name.replace(' ', '_').replace('(', '').replace(')', '')}.log")
    with ServerProcess(cmd, f"http://127.0.0.1:{port}", log, startup_timeout_s=900, env=env, cwd=ROOT,
                       ready_path=ready_path, poll_s=0.05) as srv:
        seconds = srv.startup_s
    with open(log, errors="replace") as f:
        return {"seconds": seconds, "breakdown": _breakdown(f.read())}


def measure(name: str, fn, repeat: int, fresh_cache: bool, cache_dir: str, warmup: bool) -> dict:
    """Run fn(env) `repeat` times; a fresh PAGODA_CACHE_DIR each time for cold rows."""
    runs = []
    for i in range(repeat + (1 if warmup else 0)):
        env = dict(os.environ)
        tmp = tempfile.mkdtemp(prefix="pagoda-cold-") if fresh_cache else None
        env["PAGODA_CACHE_DIR"] = tmp or cache_dir
        load_before = os.getloadavg()[0]
        try:
            res = fn(env)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        res["load_avg_1m"] = load_before
        if warmup and i == 0:
            print(f"  {name}: warm-up run {res['seconds']:.2f}s (not counted)", flush=True)
            continue
        print(f"  {name}: {res['seconds']:.2f}s" + (f"  [{res['breakdown']}]" if res.get("breakdown") else ""),
              flush=True)
        runs.append(res)
    secs = [r["seconds"] for r in runs]
    return {"name": name, "median_s": statistics.median(secs), "min_s": min(secs), "max_s": max(secs),
            "runs": runs}


def markdown(rows: list[dict], machine: str, repeat: int) -> str:
    lines = [f"Start-up on {machine}, bundled SmolLM2-135M Q4_1 GGUF, {repeat} runs each "
             "(median, min-max); load avg = 1-minute load average before each run",
             "", "| what | seconds (median) | min-max | load avg | pagoda's breakdown (last run) |",
             "|---|---|---|---|---|"]
    for r in rows:
        loads = [x["load_avg_1m"] for x in r["runs"]]
        extra = ""
        if "import_s" in r["runs"][-1]:
            imp = statistics.median(x["import_s"] for x in r["runs"])
            extra = f" (+ import pagoda {imp:.2f}s)"
        lines.append(f"| {r['name']} | {r['median_s']:.2f}{extra} | {r['min_s']:.2f}-{r['max_s']:.2f} | "
                     f"{min(loads):.1f}-{max(loads):.1f} | {r['runs'][-1].get('breakdown') or ''} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--llamacpp-python", default=os.environ.get("LLAMACPP_PYTHON", "/work/llamacpp-venv/bin/python"))
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--only", nargs="+", metavar="ROW",
                    help='run only the rows whose names start with these (e.g. "LLM() warm" "pagoda serve")')
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's --n_threads")
    ap.add_argument("--port", type=int, default=8193)
    ap.add_argument("--output-json", default=os.path.join(HERE, "results", "startup.json"))
    a = ap.parse_args()
    gguf = bundled_gguf()
    cache_dir = os.environ.get("PAGODA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pagoda")
    log_dir = os.path.join(os.path.dirname(os.path.abspath(a.output_json)), "startup_logs")
    os.makedirs(log_dir, exist_ok=True)
    serve = [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", "--host", "127.0.0.1",
             "--port", str(a.port)]
    rows = []

    def server(cmd, path, name):
        return lambda env: run_server(cmd, a.port, path, env, log_dir, name)

    plan = [("LLM() warm", run_llm, False, True), ("LLM() cold", run_llm, True, False),
            ("pagoda serve warm", None, False, True), ("pagoda serve cold", None, True, False)]
    venv = os.environ.get("PAGODA_VENV") or os.path.join(ROOT, ".venv")
    if os.path.exists(os.path.join(venv, "bin", "pagoda")):
        plan.append(("make serve (set-up venv)", None, False, True))
    else:
        print(f"(no make serve row: {venv}/bin/pagoda not found)")

    def wanted(name: str) -> bool:
        return not a.only or any(name.lower().startswith(o.lower()) for o in a.only)

    if not a.skip_llamacpp and wanted("llama.cpp server"):
        if not os.path.exists(a.llamacpp_python):
            sys.exit(f"--llamacpp-python: {a.llamacpp_python} not found; install llama-cpp-python[server] "
                     "in its own venv (see this file's docstring) or pass --skip-llamacpp")
        plan.append(("llama.cpp server", None, False, True))
    if a.only:
        plan = [p for p in plan if wanted(p[0])]
        if not plan:
            sys.exit(f"--only: no row starts with {a.only}")
    for name, fn, cold, warmup in plan:
        if fn is None and name.startswith("pagoda serve"):
            fn = server(serve, "/health", name)
        elif fn is None and name.startswith("make serve"):
            fn = server(["make", "-s", "serve", f"ARGS=--host 127.0.0.1 --port {a.port}"], "/health", name)
        elif fn is None:
            fn = server(llamacpp_server_cmd(a.llamacpp_python, gguf, a.threads, a.port), "/v1/models", name)
        print(f"### {name}", flush=True)
        rows.append(measure(name, fn, a.repeat, cold, cache_dir, warmup))
    machine = f"{os.cpu_count()} CPU cores ({platform_cpu()})"
    md = markdown(rows, machine, a.repeat)
    print("\n" + md)
    os.makedirs(os.path.dirname(os.path.abspath(a.output_json)), exist_ok=True)
    with open(a.output_json, "w") as f:
        json.dump({"machine": machine, "gguf": gguf, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "rows": rows}, f, indent=1)
    with open(os.path.splitext(a.output_json)[0] + ".md", "w") as f:
        f.write(md + "\n")
    print(f"\nwrote {a.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
