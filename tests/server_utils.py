"""Start a real `pagoda serve` subprocess on 127.0.0.1 for end-to-end tests.

    with PagodaServer(["--max-model-len", "2048"]) as server:
        client = server.openai_client()

The server binds a free loopback port, its output goes to a temp file (shown when startup fails),
and ``stop()`` sends SIGTERM and returns the exit status (a drained shutdown exits 0).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

import httpx

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 240.0  # first model load on a busy 2-core machine


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class PagodaServer:
    def __init__(self, args: list[str] = (), env: Optional[dict[str, str]] = None,
                 startup_timeout: float = STARTUP_TIMEOUT_S):
        self.args = list(args)
        self.env = env or {}
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self._log = tempfile.NamedTemporaryFile(prefix="pagoda-serve-", suffix=".log", delete=False)

    # ---------------------------------------------------------------------------- lifecycle
    def start(self) -> "PagodaServer":
        cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", "--host", HOST,
               "--port", str(self.port), *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pagoda serve exited with {self.proc.returncode} during startup:\n"
                                   f"{self.log()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"pagoda serve not healthy after {self.startup_timeout}s:\n{self.log()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> Optional[int]:
        """Signal the server and wait for it to exit; returns its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self) -> "PagodaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.close()
        os.unlink(self._log.name)

    def log(self) -> str:
        with open(self._log.name, errors="replace") as f:
            return f.read()

    # ------------------------------------------------------------------------------ clients
    def openai_client(self, api_key: str = "EMPTY", **kw):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kw)

    def async_openai_client(self, api_key: str = "EMPTY", **kw):
        import openai
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kw)

    def metrics(self, headers: Optional[dict] = None) -> dict[str, float]:
        """Scrape /metrics into {'name{labels}': value} (labels as printed by prometheus_client)."""
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=10).text
        return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (read from /proc)."""
    import pathlib
    out = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def engine_core_pid(server_pid: int) -> int:
    """The engine-core process of a `pagoda serve --engine-core process` (a spawned child)."""
    for c in child_pids(server_pid):
        try:
            cmd = open(f"/proc/{c}/cmdline", "rb").read()
        except OSError:
            continue
        if b"spawn_main" in cmd:
            return c
    raise LookupError(f"no engine-core child of {server_pid}")
