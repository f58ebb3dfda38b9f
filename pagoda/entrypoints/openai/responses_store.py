"""Stored Responses: what `GET /v1/responses/{id}`, `previous_response_id` and cancelling read.

In memory, in each API server process (with --api-server-count N, a response is found only by
the process that made it), bounded two ways: at most --responses-store-size responses (the least
recently used is dropped first; a background response still running is dropped last, and
cancelled when it is), and each is forgotten --responses-store-ttl seconds after its last use.
Used from the event loop only, so no locks.
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

from .protocol import ResponseObject


@dataclass
class StoredResponse:
    response: ResponseObject
    # the conversation through this response's output, as chat messages (previous_response_id)
    messages: list[dict[str, Any]] = field(default_factory=list)
    # background responses: every stream event so far (replayed by GET ?stream=true), a
    # condition their readers wait on, and the task running them
    events: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    task: Optional[asyncio.Task] = None
    last_used: float = field(default_factory=lambda: time.monotonic())

    @property
    def finished(self) -> bool:
        return self.response.status not in ("queued", "in_progress")

    async def add_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        async with self.changed:
            self.changed.notify_all()

    async def events_after(self, starting_after: int):
        """Recorded events with sequence_number > starting_after, then live ones until the end."""
        i = 0
        while True:
            while i < len(self.events):
                e = self.events[i]
                i += 1
                if e["sequence_number"] > starting_after:
                    yield e
            if self.finished:
                return
            async with self.changed:
                if i >= len(self.events) and not self.finished:
                    await self.changed.wait()


class ResponseStore:
    def __init__(self, max_size: int = 1000, ttl_s: float = 3600.0):
        self.max_size = max_size
        self.ttl_s = ttl_s
        self._items: "OrderedDict[str, StoredResponse]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def _expire(self) -> None:
        now = time.monotonic()
        for rid in [r for r, s in self._items.items() if now - s.last_used > self.ttl_s and s.finished]:
            del self._items[rid]

    def get(self, response_id: str) -> Optional[StoredResponse]:
        self._expire()
        s = self._items.get(response_id)
        if s is not None:
            s.last_used = time.monotonic()
            self._items.move_to_end(response_id)
        return s

    def put(self, stored: StoredResponse) -> None:
        self._expire()
        self._items[stored.response.id] = stored
        self._items.move_to_end(stored.response.id)
        while len(self._items) > self.max_size:
            victim = next((r for r, s in self._items.items() if s.finished), None)
            if victim is None:
                victim = next(iter(self._items))
            s = self._items.pop(victim)
            if s.task is not None and not s.task.done():
                s.task.cancel()
