"""Tool calls out of generated text, for `--enable-auto-tool-choice --tool-call-parser NAME`.

Each parser reads one model family's format (vLLM's parser names):
- `hermes` (Qwen2.5, Qwen3, Hermes):
      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>
- `llama3_json` (Llama 3.1 / 3.2 JSON tool calling): the output is the call(s) themselves,
      {"name": "get_weather", "parameters": {"city": "Paris"}}
  (optionally after `<|python_tag|>`, several joined by `;`).
- `mistral`: `[TOOL_CALLS][{"name": "get_weather", "arguments": {...}}]`, or the newer
  `[TOOL_CALLS]get_weather[ARGS]{...}`; call ids are 9 alphanumerics, as Mistral's templates need.
- `pythonic` (Llama 3.2 / 4): `[get_weather(city="Paris"), get_time()]`, Python literals as
  arguments.
- `qwen3_coder` (Qwen3-Coder's XML):
      <tool_call>
      <function=get_weather>
      <parameter=city>
      Paris
      </parameter>
      </function>
      </tool_call>
  parameter values are typed by the tool's JSON schema (numbers, booleans, objects), else text.

Text outside the calls is the message content; a call that does not parse stays in the content,
so nothing the model wrote is dropped. Markers that a model's tokenizer counts as special tokens
(Mistral's `[TOOL_CALLS]`, Llama's `<|python_tag|>`) reach the parser only when the request sets
`skip_special_tokens: false`; the end-of-turn token that then ends the text is ignored.
Streaming: content streams until a call can begin; from there the text is held until the request
finishes, then parsed once and sent as one delta with every call. `strict: true` tools constrain
`tool_choice: auto` through `structural_tag`: once the model opens a call, the grammar holds it to
the tool's schema (JSON formats only).
"""
from __future__ import annotations

import ast
import json
import random
import re
import string
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "pythonic", "qwen3_coder")


@dataclass
class ParsedOutput:
    content: Optional[str]
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    first: int = -1   # where the first call starts (-1: none)
    after: str = ""   # text from `first` on that is not a parsed call (kept as content)


def tool_call(name: str, arguments: Any, call_id: Optional[str] = None) -> dict[str, Any]:
    """One OpenAI tool call (arguments as JSON text)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id or f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
            "function": {"name": name, "arguments": args}}


def _first_tag(text: str, tags: tuple[str, ...]) -> int:
    found = [i for i in (text.find(t) for t in tags) if i >= 0]
    return min(found) if found else -1


def _partial_tag(text: str, tags: tuple[str, ...]) -> int:
    """Where content must stop: at the first tag, or before an end that could grow into one."""
    first = _first_tag(text, tags)
    if first >= 0:
        return first
    for k in range(min(max(len(t) for t in tags) - 1, len(text)), 0, -1):
        if any(t.startswith(text[-k:]) for t in tags):
            return len(text) - k
    return len(text)


def _strip_end(text: str, markers: tuple[str, ...]) -> str:
    """The text without an end-of-turn marker (kept when skip_special_tokens is false)."""
    text = text.rstrip()
    for m in markers:
        if text.endswith(m):
            return text[:-len(m)].rstrip()
    return text


def _function(tool: dict) -> dict:
    return tool.get("function", tool) if isinstance(tool, dict) else {}


class ToolParser:
    """The shared shape: parse a whole output, say how much may stream as content, and (for
    JSON formats) the structural tag that holds `strict` tools to their schemas."""
    tags: tuple[str, ...] = ()      # what opens a call (content streams up to it)
    trigger: Optional[str] = None   # strict tools: the text after which a call must follow

    def parse(self, text: str, tools: Optional[list] = None) -> ParsedOutput:
        raise NotImplementedError

    def stream_split(self, text: str) -> int:
        return _partial_tag(text, self.tags)

    def call_begin_end(self, name: str) -> Optional[tuple[str, str]]:
        """Strict tools: the text around a call's arguments (JSON formats)."""
        return None

    def structural_tag(self, tools: list) -> Optional[str]:
        """xgrammar structural tag: free text, but a call, once opened, must follow its tool's
        schema (`strict` tools; the others' arguments may be any JSON object)."""
        if self.trigger is None:
            return None
        tags = []
        for tool in tools:
            fn = _function(tool)
            begin, end = self.call_begin_end(fn["name"])
            schema = fn.get("parameters") if fn.get("strict") else None
            tags.append({"type": "tag", "begin": begin, "end": end, "content": {
                "type": "json_schema", "json_schema": schema or {"type": "object"}}})
        return json.dumps({"type": "structural_tag", "format": {
            "type": "triggered_tags", "triggers": [self.trigger], "tags": tags}}, ensure_ascii=False)


class HermesToolParser(ToolParser):
    start, end = "<tool_call>", "</tool_call>"
    tags = (start,)
    trigger = start
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str, tools: Optional[list] = None) -> ParsedOutput:
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
                calls.append(tool_call(obj["name"], obj.get("arguments", obj.get("parameters", {}))))
            else:
                kept.append(m.group(0))
            pos = m.end()
        kept.append(text[pos:])
        return _result(text, first, calls, "".join(kept))

    def call_begin_end(self, name: str) -> tuple[str, str]:
        return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": ', "}\n</tool_call>"


def _result(text: str, first: int, calls: list, after: str) -> ParsedOutput:
    if not calls:
        return ParsedOutput(text)
    content = (text[:first] + after).strip()
    return ParsedOutput(content or None, calls, first, after)


def _json_calls(body: str, separators: str = ";,") -> Optional[list[dict]]:
    """JSON objects back to back (whitespace or a separator between them), or None."""
    dec = json.JSONDecoder()
    objs, i = [], 0
    while True:
        while i < len(body) and (body[i].isspace() or body[i] in separators):
            i += 1
        if i >= len(body):
            return objs or None
        try:
            obj, i = dec.raw_decode(body, i)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        objs.append(obj)


class Llama3JsonToolParser(ToolParser):
    python_tag = "<|python_tag|>"
    trigger = '{"name": '

    def parse(self, text: str, tools: Optional[list] = None) -> ParsedOutput:
        body = _strip_end(text.strip(), ("<|eom_id|>", "<|eot_id|>"))
        if body.startswith(self.python_tag):
            body = body[len(self.python_tag):]
        if not body.lstrip().startswith("{"):
            return ParsedOutput(text)
        objs = _json_calls(body)
        if objs is None:
            return ParsedOutput(text)
        calls = [tool_call(o["name"], o.get("parameters", o.get("arguments", {}))) for o in objs]
        return ParsedOutput(None, calls, len(text) - len(text.lstrip()), "")

    def stream_split(self, text: str) -> int:
        head = text.lstrip()
        if not head or head.startswith("{") or head.startswith(self.python_tag) or \
                self.python_tag.startswith(head):
            return 0  # the output may be a call: nothing is content yet
        return len(text)

    def call_begin_end(self, name: str) -> tuple[str, str]:
        return f'{{"name": {json.dumps(name)}, "parameters": ', "}"


def _mistral_id() -> str:
    return "".join(random.choices(string.ascii_letters + string.digits, k=9))


class MistralToolParser(ToolParser):
    start = "[TOOL_CALLS]"
    tags = (start,)
    trigger = start
    _args = "[ARGS]"

    def parse(self, text: str, tools: Optional[list] = None) -> ParsedOutput:
        first = text.find(self.start)
        if first < 0:
            return ParsedOutput(text)
        calls = []
        for part in _strip_end(text[first:], ("</s>",)).split(self.start)[1:]:
            part = part.strip()
            if part.startswith("["):  # [{"name": ..., "arguments": ...}, ...]
                try:
                    objs = json.loads(part)
                except json.JSONDecodeError:
                    return ParsedOutput(text)
                if not isinstance(objs, list) or not all(isinstance(o, dict) and isinstance(
                        o.get("name"), str) for o in objs):
                    return ParsedOutput(text)
                calls += [tool_call(o["name"], o.get("arguments", {}), _mistral_id()) for o in objs]
            elif self._args in part:   # name[ARGS]{...}
                name, _, args = part.partition(self._args)
                try:
                    parsed = json.loads(args)
                except json.JSONDecodeError:
                    return ParsedOutput(text)
                calls.append(tool_call(name.strip(), parsed, _mistral_id()))
            else:
                return ParsedOutput(text)
        return _result(text, first, calls, "")

    def call_begin_end(self, name: str) -> tuple[str, str]:
        return f'[TOOL_CALLS][{{"name": {json.dumps(name)}, "arguments": ', "}]"


class PythonicToolParser(ToolParser):
    wrappers = ("<|python_start|>", "<|python_end|>")

    def parse(self, text: str, tools: Optional[list] = None) -> ParsedOutput:
        body = _strip_end(text.strip(), ("<|eom|>", "<|eot|>", "<|eot_id|>", "<|eom_id|>"))
        for w in self.wrappers:
            body = body.replace(w, "")
        body = body.strip()
        if not (body.startswith("[") and body.endswith("]")):
            return ParsedOutput(text)
        try:
            tree = ast.parse(body, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                return ParsedOutput(text)
            calls = []
            for node in tree.elts:
                if not isinstance(node, ast.Call) or node.args:
                    return ParsedOutput(text)
                name = ast.unparse(node.func)
                args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
                calls.append(tool_call(name, args))
        except (SyntaxError, ValueError, TypeError):
            return ParsedOutput(text)
        return ParsedOutput(None, calls, len(text) - len(text.lstrip()), "")

    def stream_split(self, text: str) -> int:
        head = text.lstrip()
        if not head or head.startswith("[") or any(head.startswith(w) or w.startswith(head)
                                                  for w in self.wrappers):
            return 0
        return len(text)


class Qwen3CoderToolParser(ToolParser):
    tags = ("<tool_call>", "<function=")
    _fn = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.DOTALL)
    _param = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)
    _wrapped = re.compile(r"<tool_call>\s*(<function=.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    @staticmethod
    def _typed(value: str, schema: dict) -> Any:
        kind = schema.get("type") if isinstance(schema, dict) else None
        if kind == "string":
            return value
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        if kind in ("integer", "number") and isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
            return parsed
        if kind == "boolean" and isinstance(parsed, bool):
            return parsed
        if kind in ("object", "array") and isinstance(parsed, (dict, list)):
            return parsed
        return parsed if kind is None else value

    def parse(self, text: str, tools: Optional[list] = None) -> ParsedOutput:
        first = _first_tag(text, self.tags)
        if first < 0 or text.find("<function=", first) < 0:
            return ParsedOutput(text)
        schemas = {_function(t).get("name"): (_function(t).get("parameters") or {}).get("properties", {})
                   for t in tools or []}
        calls, kept, pos = [], [], first
        blocks = list(self._wrapped.finditer(text, first)) or list(self._fn.finditer(text, first))
        for m in blocks:
            kept.append(text[pos:m.start()])
            fn = self._fn.search(m.group(0))
            if fn is None:
                kept.append(m.group(0))
            else:
                name = fn.group(1).strip()
                props = schemas.get(name, {})
                args = {p.strip(): self._typed(v, props.get(p.strip(), {}))
                        for p, v in self._param.findall(fn.group(2))}
                calls.append(tool_call(name, args))
            pos = m.end()
        kept.append(text[pos:])
        return _result(text, first, calls, "".join(kept))


_PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser, "mistral": MistralToolParser,
            "pythonic": PythonicToolParser, "qwen3_coder": Qwen3CoderToolParser}


def get_tool_parser(name: str) -> ToolParser:
    cls = _PARSERS.get(name)
    if cls is None:
        raise ValueError(f"--tool-call-parser: unknown parser {name!r}; supported: "
                         f"{', '.join(TOOL_CALL_PARSERS)}")
    return cls()
