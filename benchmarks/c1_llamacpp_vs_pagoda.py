"""C1 through HTTP: llama.cpp's server and `pagoda serve` on the same GGUF, measured in one run.

Each server is started alone (the machine has 2 cores), warmed up with one short request, then
loaded by `pagoda bench serve` with the 8 built-in chat prompts, 128 tokens each, EOS ignored,
greedy: once one request at a time (--max-concurrency 1) and once all 8 at once. The servers
are stopped between runs. Then, in the same run, the machine's ceilings (benchmarks/cpu_ceilings.py:
copy GB/s, fp32 matmul GFLOP/s, one decode step's packed matmuls) with no server running.
Results: one JSON per run, a combined table (printed and written as markdown) and one PNG.

llama.cpp comes from PyPI in its own venv, not pagoda's:
    python -m venv /work/llamacpp-venv && /work/llamacpp-venv/bin/pip install "llama-cpp-python[server]"

usage: python benchmarks/c1_llamacpp_vs_pagoda.py [--llamacpp-python PY] [--out-dir DIR] [--plot PNG]
                                                  [--skip-ceilings]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
NUM_PROMPTS, MAX_TOKENS = 8, 128
# Both servers get the same body. ignore_eos is vLLM's field (pagoda honours it, llama.cpp ignores
# it); min_tokens holds EOS back on both, so every request really generates MAX_TOKENS tokens.
EXTRA = ["--ignore-eos", "--extra-body", json.dumps({"min_tokens": MAX_TOKENS})]


def bundled_gguf() -> str:
    from pagoda.worker.loader import bundled_model_path
    return bundled_model_path()


def llamacpp_server_cmd(python: str, gguf: str, threads: int, port: int) -> list[str]:
    """llama.cpp's server (llama-cpp-python's) on `gguf`, as every benchmark here starts it."""
    return [python, "-m", "llama_cpp.server", "--model", gguf, "--n_threads", str(threads),
            "--n_ctx", "2048",
            # its default cuts a running stream off when another request arrives; queue them instead
            "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port)]


def bench_serve(url: str, label: str, concurrency: int, out_json: str) -> dict:
    cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", "bench", "serve", "--base-url", url,
           "--endpoint", "/v1/chat/completions", "--workload", "synthetic-chat",
           "--num-prompts", str(NUM_PROMPTS), "--max-tokens", str(MAX_TOKENS), *EXTRA,
           "--temperature", "0", "--request-rate", "inf", "--max-concurrency", str(concurrency),
           "--label", label, "--output-json", out_json, "--disable-tqdm"]
    print("$", " ".join(cmd), flush=True)
    load_before = os.getloadavg()[0]
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(out_json) as f:
        res = json.load(f)
    # other work on the machine skews CPU numbers: keep the 1-minute load average beside them
    res["load_avg_1m"] = [load_before, os.getloadavg()[0]]
    with open(out_json, "w") as f:
        json.dump(res, f, indent=1)
    return res


def warm_up(url: str) -> None:
    cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", "bench", "serve", "--base-url", url,
           "--endpoint", "/v1/chat/completions", "--num-prompts", "1", "--max-tokens", "8",
           "--disable-tqdm"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def run_server(name: str, cmd: list[str], port: int, out_dir: str, startup_s: float,
               log_path: str) -> list[dict]:
    from pagoda.bench.server_process import ServerProcess
    url = f"http://127.0.0.1:{port}"
    print(f"\n### {name}: {' '.join(cmd)}", flush=True)
    with ServerProcess(cmd, url, log_path, startup_s, cwd=ROOT):
        warm_up(url)
        return [bench_serve(url, f"{name} c{c}", c, os.path.join(out_dir, f"{name}_c{c}.json"))
                for c in (1, NUM_PROMPTS)]


def markdown(results: list[dict], machine: str) -> str:
    lines = [f"C1 on {machine}: {NUM_PROMPTS} chat prompts x {MAX_TOKENS} tokens, greedy, EOS ignored",
             "",
             "| server | in flight | output tok/s (aggregate) | tokens counted | TTFT p50 ms | TPOT p50 ms "
             "| E2E p50 ms | errors | load avg before/after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["summary"]
        name, conc = r["label"].rsplit(" c", 1)
        lines.append(f"| {name} | {conc} | {s['output_throughput']:.1f} | {s['output_tokens']} | "
                     f"{s['ttft_ms']['p50']:.0f} | {s['tpot_ms']['p50']:.1f} | {s['e2e_ms']['p50']:.0f} | "
                     f"{s['errors']} | {r['load_avg_1m'][0]:.1f}/{r['load_avg_1m'][1]:.1f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct).")
    ap.add_argument("--llamacpp-python", default=os.environ.get("LLAMACPP_PYTHON",
                                                                "/work/llamacpp-venv/bin/python"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llamacpp-port", type=int, default=8181)
    ap.add_argument("--pagoda-port", type=int, default=8182)
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results", "c1"))
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "bench_c1.png"))
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-pagoda", action="store_true")
    ap.add_argument("--skip-ceilings", action="store_true", help="Do not measure the CPU's ceilings.")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--replot", action="store_true", help="Start no server: redraw the table and plot "
                    "from the JSON files already in --out-dir.")
    a = ap.parse_args()
    gguf = a.model or bundled_gguf()
    os.makedirs(a.out_dir, exist_ok=True)
    results: list[dict] = []
    if a.replot:
        for name in ("llama.cpp", "pagoda"):
            for c in (1, NUM_PROMPTS):
                path = os.path.join(a.out_dir, f"{name}_c{c}.json")
                if os.path.exists(path):
                    with open(path) as f:
                        results.append(json.load(f))
    if not a.skip_llamacpp and not a.replot:
        if not os.path.exists(a.llamacpp_python):
            sys.exit(f"--llamacpp-python: {a.llamacpp_python} not found; install llama-cpp-python[server] "
                     "in its own venv (see this file's docstring)")
        results += run_server("llama.cpp", llamacpp_server_cmd(a.llamacpp_python, gguf, a.threads,
                                                               a.llamacpp_port),
                              a.llamacpp_port, a.out_dir, a.startup_timeout,
                              os.path.join(a.out_dir, "llamacpp_server.log"))
    if not a.skip_pagoda and not a.replot:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # torch's CPU threads in the server
        results += run_server("pagoda", [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", "--model", gguf,
                                         "--host", "127.0.0.1", "--port", str(a.pagoda_port)],
                              a.pagoda_port, a.out_dir, a.startup_timeout,
                              os.path.join(a.out_dir, "pagoda_server.log"))
    machine = f"{os.cpu_count()} CPU cores ({platform_cpu()})"
    md = markdown(results, machine)
    if not a.skip_ceilings and not a.replot:
        md += "\n\n" + ceilings(gguf, a.threads, os.path.join(a.out_dir, "ceilings.json"))
    print("\n" + md)
    with open(os.path.join(a.out_dir, "c1.md"), "w") as f:
        f.write(md + "\n")
    if a.plot and results:
        from pagoda.bench.report import plot_serve_compare
        plot_serve_compare(results, a.plot, f"C1: {NUM_PROMPTS} chat prompts x {MAX_TOKENS} tokens, greedy, "
                           f"bundled SmolLM2-135M Q4_1 GGUF, {machine}")
        print(f"plot: {a.plot}")
    short = [r["label"] for r in results if r["summary"]["output_tokens"] != NUM_PROMPTS * MAX_TOKENS]
    if short:
        print(f"note: fewer than {NUM_PROMPTS * MAX_TOKENS} tokens counted for {', '.join(short)} "
              "(failed requests, EOS, or several tokens per chunk without a usage report)")
    return 0


def ceilings(gguf: str, threads: int, out_json: str) -> str:
    """benchmarks/cpu_ceilings.py in this run (no server up): one markdown line of its figures."""
    cmd = [sys.executable, os.path.join(HERE, "cpu_ceilings.py"), "--threads", str(threads),
           "--model", gguf, "--out", out_json]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(out_json) as f:
        c = json.load(f)
    one = min((r for r in c["packed_matmuls"] if r["tokens"] == 1), key=lambda r: r["ms"])
    return (f"Ceilings in the same run ({threads} threads, load average {c['load_avg_at_start'][0]:.1f}): "
            f"copy {c['copy_GBps']:.1f} GB/s (read + write), read {c['read_GBps']:.1f} GB/s, fp32 matmul "
            f"{c['matmul_fp32_GFLOPs']:.0f} GFLOP/s; one decode step's packed matmuls "
            f"{one['ms']:.2f} ms at 1 token ({one['isa']}, {one['read_GBps']:.1f} GB/s of blocks).")


def platform_cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
