"""Images of chat requests (vision-language models): the image_url parts' URLs fetched
concurrently on the event loop (network waits only), decoded and preprocessed by the model's
image processor in a pool of worker threads, never on the event loop nor in the engine core.

A refused image is an OpenAI error naming the part (`messages.<i>.content.<j>.image_url`):
413 for an image over --max-image-bytes, 400 for everything else (bad base64, not an image,
unsupported scheme, a host or path that is not allowed, an unreachable URL, too many images
or pixels).
"""
from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Awaitable, Callable

from pagoda.inputs.media import MediaConnector, MediaError

from .errors import OpenAIError


class ServingMedia:
    def __init__(self, engine: Any):
        self.mm = engine.processor.mm_processor
        self.connector = MediaConnector.from_args(engine.engine_args)
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                        thread_name_prefix="pagoda-media")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _in_pool(self, fn, *args, param: str = "messages"):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args))
        except MediaError as e:
            raise OpenAIError(str(e), e.status, param=param) from e
        except ValueError as e:
            raise OpenAIError(str(e), param=param) from e

    async def _image(self, param: str, url: str):
        try:
            data = await self.connector.fetch(url)
        except MediaError as e:
            raise OpenAIError(str(e), e.status, param=param) from e
        return await self._in_pool(self.connector.decode, data, url, param=param)

    async def prompt(self, text: str, urls: list[tuple[str, str]],
                     encode: Callable[[str], Awaitable[list[int]]]) -> dict:
        """The engine prompt of a rendered chat whose images are at `urls` ((param, url) in
        order): {"prompt_token_ids", "mm_features"}. `encode` tokenizes (the tokenizer's own
        thread)."""
        mm = self.mm
        try:
            mm.check_count(len(urls), "messages")
        except ValueError as e:
            raise OpenAIError(str(e), param="messages") from e
        images = await asyncio.gather(*(self._image(p, u) for p, u in urls))
        items = await self._in_pool(mm.process_images, list(images))
        try:
            expanded = mm.expand_text(text, items, "messages")
        except ValueError as e:
            raise OpenAIError(f"{e} (the chat template wrote them)", param="messages") from e
        ids = await encode(expanded)
        feats = await self._in_pool(mm.features, ids, items, "messages")
        return {"prompt_token_ids": ids, "mm_features": feats}
