"""Async plumbing the endpoints share: SSE framing, merging several output streams, and
cancelling work when the client goes away (cancelling an engine stream aborts its request)."""
from __future__ import annotations

import asyncio
import json
import logging
from contextlib import aclosing
from typing import AsyncIterator, Awaitable, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .errors import OpenAIError, error_body

logger = logging.getLogger("pagoda.server")

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering


def sse(payload: BaseModel | dict) -> str:
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload)}\n\n"


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its generator when the response ends.

    Starlette stops iterating when the client disconnects but leaves the generator suspended;
    closing it here runs the generators' cleanup (engine abort) right away, not at GC time.
    """

    def __init__(self, content: AsyncIterator[str]):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def sse_error(e: Exception, request_id: str) -> str:
    """An error after the 200 status line was sent: an OpenAI error object as the last event."""
    if isinstance(e, OpenAIError):
        return sse(error_body(e.message, e.status, e.param, e.code))
    logger.error("stream %s failed", request_id, exc_info=e)
    return sse(error_body(f"internal error: {type(e).__name__}", 500))


def json_response(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


_END = object()


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Yield ``(stream index, item)`` from all streams as items arrive.

    Each stream is drained by its own task; closing this generator (or an error in one stream)
    cancels the others, which aborts their engine requests.
    """
    if len(streams) == 1:  # common case: no tasks, no queue
        async with aclosing(streams[0]):
            async for item in streams[0]:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]):
        try:
            async with aclosing(stream):
                async for item in stream:
                    queue.put_nowait((i, item, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, None, e))
        finally:
            queue.put_nowait((i, _END, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, err = await queue.get()
            if err is not None:
                raise err
            if item is _END:
                remaining -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ClientDisconnected.

    Streaming responses get this from Starlette; non-streaming ones (and the wait for a stream's
    first output) need it so an abandoned request stops using the engine at once.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientDisconnected()
