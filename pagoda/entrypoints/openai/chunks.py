"""Streamed chunks of /v1/completions and /v1/chat/completions as plain dicts, encoded by msgspec.

One API server process streams every token of every request: building and dumping a pydantic
model costs ~8 µs a chunk, a dict through msgspec ~1 µs. The pydantic models in protocol.py stay
the schema (non-streamed responses, docs); tests/test_stream_chunks.py holds both to the same JSON.
"""
from __future__ import annotations

from typing import Any, Optional

import msgspec
from pydantic import BaseModel

_encode = msgspec.json.Encoder().encode


def _dump(m: Optional[BaseModel]) -> Optional[dict]:
    return None if m is None else m.model_dump(mode="json")


def sse_bytes(payload: dict) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


def completion_choice(index: int, text: str, logprobs: Optional[BaseModel], finish_reason: Optional[str],
                      stop_reason: Any, token_ids: Optional[list[int]],
                      prompt_token_ids: Optional[list[int]]) -> dict:
    """CompletionChoice: token_ids and prompt_token_ids are left out when None."""
    c = {"index": index, "text": text, "logprobs": _dump(logprobs), "finish_reason": finish_reason,
         "stop_reason": stop_reason}
    if token_ids is not None:
        c["token_ids"] = token_ids
    if prompt_token_ids is not None:
        c["prompt_token_ids"] = prompt_token_ids
    return c


def completion_chunk(request_id: str, created: int, model: str, choices: list[dict],
                     usage: Optional[BaseModel]) -> bytes:
    """CompletionResponse as one SSE event."""
    return sse_bytes({"id": request_id, "object": "text_completion", "created": created, "model": model,
                      "choices": choices, "usage": _dump(usage), "system_fingerprint": None})


def chat_choice(index: int, *, role: Optional[str] = None, content: Optional[str] = None,
                reasoning_content: Optional[str] = None, tool_calls: Optional[list] = None,
                logprobs: Optional[BaseModel] = None, finish_reason: Optional[str] = None,
                stop_reason: Any = None, token_ids: Optional[list[int]] = None) -> dict:
    """ChatStreamChoice: the delta carries only the keys that are set (as OpenAI's chunks do)."""
    delta = {k: v for k, v in (("role", role), ("content", content),
                               ("reasoning_content", reasoning_content), ("tool_calls", tool_calls))
             if v is not None}
    c = {"index": index, "delta": delta, "logprobs": _dump(logprobs), "finish_reason": finish_reason,
         "stop_reason": stop_reason}
    if token_ids is not None:
        c["token_ids"] = token_ids
    return c


def chat_chunk(request_id: str, created: int, model: str, choices: list[dict],
               usage: Optional[BaseModel]) -> bytes:
    """ChatCompletionChunk as one SSE event."""
    return sse_bytes({"id": request_id, "object": "chat.completion.chunk", "created": created,
                      "model": model, "choices": choices, "usage": _dump(usage)})
