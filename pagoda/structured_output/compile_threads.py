"""Grammar compilations on a few threads, each bounded in time.

xgrammar compiles without the GIL but cannot be interrupted, and a pathological schema (a huge
enum, a regex of long bounded repeats) can compile for minutes. So a compilation that runs longer
than the timeout is *abandoned*: its future fails with `CompileTimeout` at once, and it stops
counting against the thread limit, so the compilations queued behind it start; its thread runs
to the end in the background and its result, if any, goes to `on_late`. The timer starts when
the compilation does (after `prepare`: building the tokenizer's vocabulary table, once), not
when it is queued.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

logger = logging.getLogger("pagoda.structured_output")


class CompileTimeout(TimeoutError):
    """A grammar did not compile within the limit."""


class CompileThreads:
    def __init__(self, workers: int, timeout_s: float, prepare: Optional[Callable[[], Any]] = None,
                 on_late: Optional[Callable[[Any, Any], None]] = None):
        self.workers = max(1, workers)
        self.timeout_s = timeout_s          # 0: no limit
        self._prepare = prepare
        self._on_late = on_late             # (tag, result) of an abandoned compilation that finished
        self._lock = threading.Lock()
        self._queue: deque = deque()
        self._running: dict[cf.Future, Optional[float]] = {}   # -> start time (None: preparing)
        self._closed = False

    def submit(self, fn: Callable[[], Any], tag: Any = None) -> cf.Future:
        fut: cf.Future = cf.Future()
        with self._lock:
            self._queue.append((fut, fn, tag))
            self._start_more()
        return fut

    def _start_more(self) -> None:   # under the lock
        while self._queue and len(self._running) < self.workers and not self._closed:
            fut, fn, tag = self._queue.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            self._running[fut] = None
            threading.Thread(target=self._run, args=(fut, fn, tag), daemon=True,
                             name="pagoda-grammar").start()

    def _run(self, fut: cf.Future, fn: Callable[[], Any], tag: Any) -> None:
        result, error = None, None
        try:
            if self._prepare is not None:
                self._prepare()
            with self._lock:
                if fut in self._running:
                    self._running[fut] = time.monotonic()
            result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the future
            error = e
        with self._lock:
            abandoned = fut not in self._running   # expire() took it: its future is failed
            self._running.pop(fut, None)
            self._start_more()
        if abandoned:
            logger.info("an abandoned grammar compilation ended%s", " with an error" if error else "")
            if error is None and self._on_late is not None:
                self._on_late(tag, result)
        elif error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def expire(self) -> list[cf.Future]:
        """Fail the compilations that have run longer than the timeout (and free their threads'
        places); returns their futures."""
        if not self.timeout_s:
            return []
        now = time.monotonic()
        with self._lock:
            late = [f for f, t0 in self._running.items() if t0 is not None and now - t0 > self.timeout_s]
            for f in late:
                del self._running[f]
            self._start_more()
        for f in late:
            logger.warning("a grammar compilation ran past %g s: abandoned", self.timeout_s)
            f.set_exception(CompileTimeout(f"the grammar did not compile within {self.timeout_s:g} s"))
        return late

    def next_deadline(self) -> Optional[float]:
        """Seconds until the next running compilation times out (None: none is timed)."""
        if not self.timeout_s:
            return None
        with self._lock:
            starts = [t0 for t0 in self._running.values() if t0 is not None]
        if not starts:
            return None
        return max(0.0, min(starts) + self.timeout_s - time.monotonic())

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            queued, self._queue = list(self._queue), deque()
        for fut, _, _ in queued:
            fut.cancel()
