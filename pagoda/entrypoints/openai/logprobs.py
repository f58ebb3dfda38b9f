"""Engine logprobs -> OpenAI's two response shapes (chat ``content[]`` and legacy completions)."""
from __future__ import annotations

from typing import Any, Optional

from pagoda.outputs import Logprob

from .protocol import ChatLogprobs, ChatLogprobToken, CompletionLogprobs, TopLogprob

# JSON has no -inf; OpenAI-compatible servers report this floor instead
LOGPROB_FLOOR = -9999.0

PositionLogprobs = Optional[dict[int, Logprob]]


def _finite(x: float) -> float:
    return x if x == x and x > LOGPROB_FLOOR else LOGPROB_FLOOR  # x == x is False for NaN


class TokenText:
    """Token id -> the text it decodes to alone; cached since the same ids recur constantly."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int, lp: Optional[Logprob] = None) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        text = self._cache.get(token_id)
        if text is None:
            text = (self.tokenizer.decode([token_id]) if self.tokenizer is not None
                    else f"token_id:{token_id}")
            self._cache[token_id] = text
        return text


def _top(position: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The k most likely entries (the engine may add the chosen token beyond its top k)."""
    return sorted(position.items(), key=lambda kv: -kv[1].logprob)[:k] if k > 0 else []


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], top_k: int,
                  text_of: TokenText) -> ChatLogprobs:
    content = []
    for tid, pos in zip(token_ids, positions):
        pos = pos or {}
        chosen = pos.get(tid)
        token = text_of(tid, chosen)
        content.append(ChatLogprobToken(
            token=token, logprob=_finite(chosen.logprob if chosen else LOGPROB_FLOOR),
            bytes=list(token.encode("utf-8", errors="replace")),
            top_logprobs=[TopLogprob(token=(t := text_of(i, lp)), logprob=_finite(lp.logprob),
                                     bytes=list(t.encode("utf-8", errors="replace")))
                          for i, lp in _top(pos, top_k)]))
    return ChatLogprobs(content=content)


def completion_logprobs(token_ids: list[int], positions: list[PositionLogprobs], top_k: int,
                        text_of: TokenText, text_offset: int = 0) -> CompletionLogprobs:
    """Legacy shape: parallel lists; a position without logprobs (the first prompt token) is None.
    ``top_logprobs`` holds the top ``top_k`` alternatives plus the chosen token, as OpenAI did."""
    out = CompletionLogprobs()
    offset = text_offset
    for tid, pos in zip(token_ids, positions):
        chosen = pos.get(tid) if pos else None
        token = text_of(tid, chosen)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(token)
        if pos is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_finite(chosen.logprob) if chosen else LOGPROB_FLOOR)
        top = {text_of(i, lp): _finite(lp.logprob) for i, lp in _top(pos, top_k)}
        if chosen is not None:
            top.setdefault(token, _finite(chosen.logprob))
        out.top_logprobs.append(top)
    return out
