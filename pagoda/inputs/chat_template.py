"""Chat messages -> prompt text through a Jinja chat template, with a bounded budget.

Chat templates are Jinja programs; some come from the operator (the model's own, or
``--chat-template``), and with ``--trust-request-chat-template`` from clients. Rendered with
transformers' ``apply_chat_template``, one template with two nested ``range(3000)`` loops ran
for 70 s and ``"x" * 10**11`` asks for 100 GB in one step. So pagoda renders with its own
sandboxed environment that keeps transformers' template conventions (trim_blocks,
lstrip_blocks, loop controls, ``{% generation %}``, ``tojson``, ``raise_exception``,
``strftime_now``, ``namespace``, special tokens as variables, ``continue_final_message``;
``tests/test_chat_template.py`` renders against transformers) and adds limits: a deadline and
a cancel flag checked on every attribute access, call and range step, a cap on ``range``, on
the size of ``*`` / ``**`` results and on the rendered text. A template over budget raises
``TemplateBudgetError`` (a ValueError: a 400 for the client who sent it).
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Budget of one rendering. Real templates take milliseconds and a few KB per message.
RENDER_TIMEOUT_S = 5.0
MAX_RANGE = 100_000           # items of one range() (jinja's own sandbox cap)
MAX_SEQUENCE_PRODUCT = 1 << 20  # items/chars a `*` may build from a str or list
MAX_POWER_BITS = 4096          # bits of an integer `**` result
MAX_RENDERED_CHARS = 64 << 20  # characters of rendered text


class TemplateBudgetError(ValueError):
    """The template ran past its time, size or loop budget, or its rendering was cancelled."""


@dataclass
class Budget:
    """Deadline and cancel flag of one rendering; `cancel()` may be called from any thread."""
    timeout_s: float = RENDER_TIMEOUT_S
    deadline: float = field(init=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, init=False)

    def __post_init__(self):
        self.deadline = time.monotonic() + self.timeout_s

    def cancel(self) -> None:
        self._cancelled.set()

    def check(self) -> None:
        if self._cancelled.is_set():
            raise TemplateBudgetError("chat_template: rendering was cancelled (the client left)")
        if time.monotonic() > self.deadline:
            raise TemplateBudgetError(f"chat_template: rendering took longer than {self.timeout_s:g} s; "
                                      "the template loops too much")


_CURRENT = threading.local()  # the Budget of the rendering running on this thread


def _check() -> None:
    budget = getattr(_CURRENT, "budget", None)
    if budget is not None:
        budget.check()


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant spans with it);
    for a prompt the body is rendered as is."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore names (no reaching into object internals)."""

    def __init__(*args, **kwargs):  # noqa: N805 - jinja's Namespace signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check()
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} may not start with '_'")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # not jinja's tojson, which escapes HTML characters: templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _bounded_range(*args):
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise TemplateBudgetError(f"chat_template: range() of {len(r)} items exceeds {MAX_RANGE}")
    return _CheckedIter(r)


class _CheckedIter:
    """Iterates a range, checking the budget every 256 items (loops with an empty body make no
    other call the budget could be checked in)."""

    def __init__(self, r: range):
        self.r = r

    def __len__(self):
        return len(self.r)

    def __iter__(self):
        for i, v in enumerate(self.r):
            if not i & 255:
                _check()
            yield v


class _Dict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True,
                         extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        self.filters["tojson"] = _tojson
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                            dict=_Dict(), namespace=_Namespace, range=_bounded_range)

    def call_binop(self, context, operator, left, right):
        _check()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                    if len(seq) * times > MAX_SEQUENCE_PRODUCT:
                        raise TemplateBudgetError(f"chat_template: `*` would build {len(seq) * times} "
                                                  f"items (limit {MAX_SEQUENCE_PRODUCT})")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            if abs(left) > 1 and right * max(abs(left).bit_length(), 1) > MAX_POWER_BITS:
                raise TemplateBudgetError("chat_template: `**` result is too large")
        return super().call_binop(context, operator, left, right)

    def getattr(self, obj, attribute):
        _check()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _check()
        return super().getitem(obj, argument)

    def call(self, __context, __obj, *args, **kwargs):  # noqa: N807 - jinja's signature
        _check()
        return super().call(__context, __obj, *args, **kwargs)


_ENV = BoundedEnvironment()
_COMPILED: dict[str, jinja2.Template] = {}
_COMPILED_LOCK = threading.Lock()
_MAX_COMPILED = 64  # request templates are compiled once each; keep the cache bounded
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _compile(source: str) -> jinja2.Template:
    with _COMPILED_LOCK:
        t = _COMPILED.get(source)
    if t is None:
        try:
            t = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat_template: not a valid Jinja template: {e}") from None
        with _COMPILED_LOCK:
            if len(_COMPILED) >= _MAX_COMPILED:
                _COMPILED.pop(next(iter(_COMPILED)))
            _COMPILED[source] = t
    return t


def pick_template(tokenizer, override: Optional[str], tools) -> str:
    """The template to render: the given one, else the tokenizer's (a dict of named templates
    picks "tool_use" when tools are given, else "default", as transformers does)."""
    if override:
        return override
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(template, dict):
        template = template.get("tool_use") if tools is not None and "tool_use" in template \
            else template.get("default")
    if not template:
        raise ValueError("messages: this model has no chat template; pass --chat-template")
    return template


IMAGE_PART_TYPES = ("image_url", "image")


def image_url_of(part) -> Optional[str]:
    """The URL of an OpenAI image part ({"type": "image_url", "image_url": {"url": ...}} or
    with the URL as a plain string); None for other parts."""
    if not isinstance(part, dict) or part.get("type") not in IMAGE_PART_TYPES:
        return None
    v = part.get("image_url", part.get("image"))
    if isinstance(v, dict):
        v = v.get("url")
    if not isinstance(v, str) or not v:
        raise ValueError("messages: an image_url part needs {\"url\": \"...\"}")
    return v


def image_urls(messages: list[dict]) -> list[tuple[str, str]]:
    """(param, url) of every image part of a conversation, in order."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            for j, p in enumerate(content):
                url = image_url_of(p)
                if url is not None:
                    out.append((f"messages.{i}.content.{j}.image_url", url))
    return out


def flatten_text_parts(parts: list) -> str:
    texts = []
    for p in parts:
        if isinstance(p, str):
            texts.append(p)
        elif isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str):
            texts.append(p["text"])
        elif isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES:
            raise ValueError(f"messages: {p['type']} parts need a vision-language model; this model "
                             "is text-only")
        else:
            kind = p.get("type") if isinstance(p, dict) else type(p).__name__
            raise ValueError(f"messages: content part of type {kind!r} is not supported (text only)")
    return "\n".join(texts)


def template_parts(parts: list) -> list[dict]:
    """Content parts as transformers' processors hand them to chat templates: text parts
    {"type": "text", "text"}, each image {"type": "image"} (where the template writes the
    model's image placeholder)."""
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append({"type": "text", "text": p})
        elif image_url_of(p) is not None:
            out.append({"type": "image"})
        elif isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str):
            out.append({"type": "text", "text": p["text"]})
        else:
            kind = p.get("type") if isinstance(p, dict) else type(p).__name__
            raise ValueError(f"messages: content part of type {kind!r} is not supported (text and "
                             "image_url)")
    return out


def _clean(messages: list[dict], multimodal: bool = False) -> list[dict]:
    """As transformers hands messages to templates: keys whose value is None are dropped, and
    reasoning given under one name is visible under the others templates read. Content parts:
    text parts joined, or for a vision-language model kept as a list with image parts."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if isinstance(m.get("content"), list):
            m["content"] = (template_parts if multimodal else flatten_text_parts)(m["content"])
        reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning")
                          if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render_chat(tokenizer, messages: list[dict], chat_template: Optional[str] = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                tools: Optional[list] = None, documents: Optional[list] = None,
                budget: Optional[Budget] = None, multimodal: bool = False, **template_kwargs) -> str:
    """Render one conversation to prompt text (ValueError naming the field on bad input).
    multimodal: the model takes images (content lists reach the template with image parts)."""
    if not messages:
        raise ValueError("messages: must not be empty")
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message: cannot be combined with add_generation_prompt")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError("messages: each message needs a 'role'")
    source = pick_template(tokenizer, chat_template, tools)
    template = _compile(source)
    chat = _clean(messages, multimodal)
    final = None
    if continue_final_message:
        final = chat[-1].get("content")
        if isinstance(final, str):
            chat[-1]["content"] = final + _CONTINUE_TAG
        else:
            raise ValueError("continue_final_message: the final message has no content to continue")
    specials = dict(getattr(tokenizer, "special_tokens_map", None) or {})
    variables = {**specials, **template_kwargs, "messages": chat, "tools": tools,
                 "documents": documents, "add_generation_prompt": add_generation_prompt}
    budget = budget or Budget()
    prev = getattr(_CURRENT, "budget", None)
    _CURRENT.budget = budget
    try:
        pieces, size = [], 0
        for piece in template.generate(**variables):
            size += len(piece)
            if size > MAX_RENDERED_CHARS:
                raise TemplateBudgetError(f"chat_template: rendered text exceeds {MAX_RENDERED_CHARS} "
                                          "characters")
            pieces.append(piece)
            budget.check()
        text = "".join(pieces)
    except TemplateBudgetError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
            OverflowError, ZeroDivisionError, RecursionError) as e:
        raise ValueError(f"chat_template: rendering failed: {type(e).__name__}: {e}") from None
    finally:
        _CURRENT.budget = prev
    if final is not None:
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ValueError("continue_final_message: the chat template dropped the final message's "
                             "text, so it cannot be continued")
        at = text.rindex(tag)
        text = text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
    return text
