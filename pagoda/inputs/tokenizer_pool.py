"""A few tokenizer threads, each with its own copy of the tokenizer.

Tokenizing runs off the event loop (the Rust tokenizer releases the GIL while it encodes), and
on more than one thread so that one long prompt never holds up every other request's
tokenizing: a 10 MB prompt once kept a 1-token /tokenize waiting 7 s behind it. HF fast
tokenizers must not be shared between threads (a call that changes their truncation settings
fails another thread's call with "Already borrowed"), so each thread gets a copy.
"""
from __future__ import annotations

import asyncio
import copy
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def default_size() -> int:
    return max(2, min(4, os.cpu_count() or 1))


class TokenizerPool:
    def __init__(self, tokenizer: Any, size: int | None = None):
        self.size = size or default_size()
        copies: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        for _ in range(self.size):
            copies.put(copy.deepcopy(tokenizer))
        self._local = threading.local()

        def take_copy() -> None:  # runs once in each pool thread
            self._local.tokenizer = copies.get_nowait()
        self._executor = ThreadPoolExecutor(self.size, thread_name_prefix="pagoda-tokenizer",
                                            initializer=take_copy)

    def _call(self, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
        return fn(self._local.tokenizer, *args, **kwargs)

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(tokenizer, *args, **kwargs)`` on a pool thread, with that thread's tokenizer."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, partial(self._call, fn, args, kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def longest_token_chars(tokenizer: Any) -> int:
    """Characters of the longest token string in the vocabulary (added tokens included): no
    token covers more characters of text than its own string has (a byte-level token has one
    character per byte; a byte-fallback piece like <0x0A> is longer than its byte)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max((len(t) for t in tokens if t), default=1)
