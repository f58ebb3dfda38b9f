"""Tool calls out of generated text, for `--enable-auto-tool-choice --tool-call-parser NAME`.

`hermes` is the format Qwen2.5 / Qwen3 (and Hermes) chat templates teach their models:
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
Text before the first <tool_call> is the message content; a block that is not valid JSON with a
"name" stays in the content, so nothing the model wrote is dropped.

Streaming: content streams as usual until a <tool_call> tag can begin; from there the text is
held until the request finishes, then parsed once and sent as one delta with every call.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

TOOL_CALL_PARSERS = ("hermes",)


@dataclass
class ParsedOutput:
    content: Optional[str]
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    first: int = -1   # where the first <tool_call> starts (-1: none)
    after: str = ""   # text from `first` on that is not a parsed call (kept as content)


def _call(name: str, arguments: Any) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
            "function": {"name": name, "arguments": args}}


class HermesToolParser:
    start, end = "<tool_call>", "</tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> ParsedOutput:
        """The whole output -> content and tool calls."""
        first = text.find(self.start)
        if first < 0:
            return ParsedOutput(text)
        calls, kept, pos = [], [], first
        for m in self._block.finditer(text, first):
            kept.append(text[pos:m.start()])
            try:
                obj = json.loads(m.group(1))
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict) and isinstance(obj.get("name"), str):
                calls.append(_call(obj["name"], obj.get("arguments", obj.get("parameters", {}))))
            else:
                kept.append(m.group(0))
            pos = m.end()
        kept.append(text[pos:])
        if not calls:
            return ParsedOutput(text)
        after = "".join(kept)
        content = (text[:first] + after).strip()
        return ParsedOutput(content or None, calls, first, after)

    def stream_split(self, text: str) -> int:
        """How many leading characters of the output so far can be sent as content now: up to a
        <tool_call> tag or to the longest suffix that could still become one."""
        i = text.find(self.start)
        if i >= 0:
            return i
        for k in range(min(len(self.start) - 1, len(text)), 0, -1):
            if self.start.startswith(text[-k:]):
                return len(text) - k
        return len(text)


def get_tool_parser(name: str) -> HermesToolParser:
    if name == "hermes":
        return HermesToolParser()
    raise ValueError(f"--tool-call-parser: unknown parser {name!r}; supported: "
                     f"{', '.join(TOOL_CALL_PARSERS)}")
