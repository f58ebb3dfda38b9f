"""A server started as a child process for a benchmark run: launched, polled until GET /v1/models
answers, and stopped (terminate, then kill) however the run ends."""
from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from typing import Optional


class ServerProcess:
    def __init__(self, cmd: list[str], url: str, log_path: str, startup_timeout_s: float = 600,
                 env: Optional[dict] = None, cwd: Optional[str] = None):
        self.cmd, self.url, self.log_path = cmd, url.rstrip("/"), log_path
        self.startup_timeout_s, self.env, self.cwd = startup_timeout_s, env, cwd
        self.proc: Optional[subprocess.Popen] = None

    def _log_tail(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-3000:]

    def __enter__(self) -> "ServerProcess":
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
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
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __exit__(self, *exc) -> None:
        self.stop()
