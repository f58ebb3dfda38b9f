"""A server started as a child process for a benchmark run: launched, polled until it answers
(GET /v1/models by default), and stopped (terminate, then kill) however the run ends.

The child gets its own process group, so a launcher such as `make serve` is stopped together with
the server it started. `startup_s` is the time from launch to the first good answer (polled
every `poll_s`)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from typing import Optional


class ServerProcess:
    def __init__(self, cmd: list[str], url: str, log_path: str, startup_timeout_s: float = 600,
                 env: Optional[dict] = None, cwd: Optional[str] = None, ready_path: str = "/v1/models",
                 poll_s: float = 1.0):
        self.cmd, self.url, self.log_path = cmd, url.rstrip("/"), log_path
        self.startup_timeout_s, self.env, self.cwd = startup_timeout_s, env, cwd
        self.ready_path, self.poll_s = ready_path, poll_s
        self.proc: Optional[subprocess.Popen] = None
        self.startup_s: Optional[float] = None

    def _log_tail(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-3000:]

    def __enter__(self) -> "ServerProcess":
        t0 = time.perf_counter()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=self.cwd, start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd[0]} exited with code {self.proc.returncode} before it was "
                                   f"ready:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.url} not ready after {self.startup_timeout_s:.0f} s:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(self.poll_s)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def stop(self) -> None:
        """SIGTERM to the whole group, and wait until every process of it is gone (a launcher
        may exit before the server it started has drained); SIGKILL after 60 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None or self._group_alive():
            self._signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while (self.proc.poll() is None or self._group_alive()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.proc.poll() is None or self._group_alive():
            self._signal(signal.SIGKILL)
            self.proc.wait(10)

    def __exit__(self, *exc) -> None:
        self.stop()
