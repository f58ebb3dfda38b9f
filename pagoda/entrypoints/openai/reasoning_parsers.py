"""Reasoning out of generated text, for `--reasoning-parser qwen3|deepseek_r1` (vLLM's names):
the model's `<think> ... </think>` becomes `message.reasoning_content` (and streamed
`delta.reasoning_content`), the rest stays `content`.

- `deepseek_r1`: DeepSeek-R1's template opens `<think>` in the prompt, so the output is
  reasoning from its first token until `</think>` (a leading `<think>` is dropped too); an output
  that never closes it is all reasoning (it was cut off while thinking).
- `qwen3`: Qwen3 writes `<think>` itself when thinking is on; with
  `chat_template_kwargs: {"enable_thinking": false}` the template puts an empty
  `<think></think>` in the prompt and the output is all content. Templates that open `<think>`
  in the prompt (Qwen3 "thinking" releases) are read as DeepSeek-R1's: the split starts in
  reasoning when the prompt ends with `<think>`.

The split of a growing text only ever grows (a possible tag at the end is held back until it
is whole), so streamed deltas add up to the non-streamed message.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

REASONING_PARSERS = ("qwen3", "deepseek_r1")
START, END = "<think>", "</think>"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


@dataclass
class Split:
    reasoning: Optional[str]  # None: the model did not reason
    content: str


class ReasoningParser:
    """One request's splitter (it knows whether its prompt opened `<think>`)."""

    def __init__(self, name: str, prompt_text: str = ""):
        self.name = name
        self.opens_in_prompt = name == "deepseek_r1" or prompt_text.rstrip().endswith(START)

    def split(self, text: str, final: bool = True) -> Split:
        """The reasoning and content of `text`; with final=False, the part that is settled."""
        body = text
        reasoning_mode = self.opens_in_prompt
        head = body.lstrip()
        if head.startswith(START):
            body, reasoning_mode = head[len(START):], True
        elif not final and START.startswith(head):  # could still become <think>: hold it back
            return Split("" if reasoning_mode else None, "")
        elif not reasoning_mode:
            return Split(None, text)
        end = body.find(END)
        if end < 0:
            keep = len(body) if final else len(body) - _partial_suffix(body, END)
            return Split(body[:keep], "")
        return Split(body[:end], body[end + len(END):].lstrip("\n"))


def get_reasoning_parser(name: str) -> str:
    if name not in REASONING_PARSERS:
        raise ValueError(f"--reasoning-parser: unknown parser {name!r}; supported: "
                         f"{', '.join(REASONING_PARSERS)}")
    return name
