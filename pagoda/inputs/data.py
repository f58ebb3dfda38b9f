"""vLLM's prompt shapes (``from pagoda.inputs import TextPrompt, TokensPrompt``): plain dicts,
accepted wherever a prompt is (LLM.generate, AsyncLLMEngine.generate, LLM.embed, ...)."""
from __future__ import annotations

from typing import NotRequired, TypedDict


class TextPrompt(TypedDict):
    prompt: str


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    token_type_ids: NotRequired[list[int]]
