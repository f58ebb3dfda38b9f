"""Incremental detokenization and stop strings.

Text is produced token by token with the `tokenizers` library's DecodeStream (which handles
byte-fallback pieces that only form a character together). Stop strings are searched in the new
text; while the end of the text could still be the start of a stop string it is held back from
streaming, so a client never sees part of a stop string that is later cut.
"""
from __future__ import annotations

from typing import Optional

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool,
                 stop: list[str], include_stop_str_in_output: bool):
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "_tokenizer", None) or getattr(tokenizer, "backend_tokenizer", None)
        self.skip_special_tokens = skip_special_tokens
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        # prime the stream with the prompt's tail so the first output token gets its leading space
        tail = prompt_token_ids[-6:]
        self._prime(tail)
        self.text = ""
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.max_stop = max((len(s) for s in stop), default=0)

    def _prime(self, ids: list[int]):
        for t in ids:
            try:
                self.stream.step(self.backend, t)
            except Exception:
                self.stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int, check_stop: bool = True) -> Optional[str]:
        """Append one token; returns the stop string that ended generation, if any."""
        chunk = self.stream.step(self.backend, token_id)
        if not chunk:
            return None
        start = len(self.text)
        self.text += chunk
        if not (self.stop and check_stop):
            return None
        search_from = max(0, start - self.max_stop + 1)
        best = None
        for s in self.stop:
            p = self.text.find(s, search_from)
            if p != -1 and (best is None or p < best[0]):
                best = (p, s)
        if best is None:
            return None
        p, s = best
        self.text = self.text[:p + len(s)] if self.include_stop else self.text[:p]
        return s

    def stable_len(self, finished: bool) -> int:
        """Length of text that is safe to stream: all of it once finished, otherwise everything
        except a suffix that is a prefix of some stop string."""
        if finished or not self.stop:
            return len(self.text)
        t = self.text
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(t)), hold, -1):
                if t.endswith(s[:k]):
                    hold = k
                    break
        return len(t) - hold


def decode_token(tokenizer, token_id: int) -> str:
    """Text of a single token, as shown in logprobs."""
    return tokenizer.decode([token_id], skip_special_tokens=False)
