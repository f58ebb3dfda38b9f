"""Where start-up time goes: phases marked as they end, logged as one INFO line.

    startup 2.1s: config 0.1s, tokenizer 0.3s, weights 1.2s, kv cache 0.0s, other 0.1s;
    4 C kernels compiled in the background in 0.6s (waited 0.0s)

The engine marks its phases; `pagoda serve` adds the process's own start (interpreter and
imports) and the server's. Figures side by side with llama.cpp: benchmarks/startup.py.
"""
from __future__ import annotations

import os
import time


class StartupTimes:
    def __init__(self):
        self.t0 = self._last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def mark(self, name: str) -> None:
        """The time since the previous mark (or the start) was spent in `name`."""
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now

    @property
    def total(self) -> float:
        return self._last - self.t0

    def line(self, what: str = "startup") -> str:
        from pagoda.kernels import cpu_build
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in self.phases.items())
        out = f"{what} {self.total:.1f}s: {parts}"
        k = cpu_build.build_times()
        if k is not None and k["seconds"] is None:
            out += f"; C kernels still compiling in the background (waited {k['waited']:.1f}s)"
        elif k is not None and k["compiled"]:
            out += (f"; {k['compiled']} C kernels compiled in the background in {k['seconds']:.1f}s "
                    f"(waited {k['waited']:.1f}s)")
        return out


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc), or None where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
