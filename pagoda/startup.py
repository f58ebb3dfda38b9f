"""Where start-up time goes: phases marked as they end, logged as one INFO line.

    startup 2.1s: config 0.1s, tokenizer 0.3s, weights 1.2s, kv cache 0.0s, other 0.1s;
    4 C kernels compiled in the background in 0.6s (waited 0.0s)

The engine marks its phases; `LLM()` adds the imports before them and its tokenizer (the line
"LLM startup ..."); `pagoda serve` adds the process's own start (interpreter and imports) and the
server's. Figures side by side with llama.cpp: benchmarks/startup.py.
"""
from __future__ import annotations

import contextlib
import gc
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

    def started_at(self, t0: float, name: str) -> None:
        """The time from `t0` to this record's start was spent in `name` (what ran before the
        worker existed: the offline front end's imports of torch and the engine)."""
        self.phases = {name: self.t0 - t0, **self.phases}
        self.t0 = t0

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


_first_start = True


@contextlib.contextmanager
def first_start_gc():
    """The cyclic garbage collector paused through the first engine start in a process: a warm
    `LLM()` spent ~0.4 s of the 2-core machine's time in full collections walking torch's and
    transformers' import-time objects as they were made. What the caller left before is
    collected first. Nothing is frozen here (gc.freeze would keep a deleted LLM's engine and its
    KV cache alive: an offline user frees one engine before making the next; servers freeze
    with `freeze_after_start`). A start that fails pauses it again next time; later starts
    import nothing new and run with the collector as it is."""
    global _first_start
    if not _first_start or not gc.isenabled():
        yield
        return
    gc.collect()
    gc.disable()
    ok = False
    try:
        yield
        ok = True
    finally:
        if ok:
            _first_start = False
        gc.enable()


def freeze_after_start() -> None:
    """For server processes, which keep their engine until they exit: collect once, then move
    every object alive into the permanent generation (gc.freeze, as vLLM's server does), so a
    full collection while serving walks only what requests made. With the ~250k objects of
    torch, transformers and the bundled model's engine a full collection took ~200 ms on the
    2-core machine, with the GIL held (engine steps and streams stalled); frozen, ~0.01 ms."""
    gc.collect()
    gc.freeze()
