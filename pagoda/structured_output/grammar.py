"""StructuredOutputsParams -> an xgrammar Grammar, and validation of the request's constraint.

A Grammar is the constraint parsed and converted (JSON schema, regex and choice all become one
grammar form), without the tokenizer: building one is how the front end checks a request
(`validate_structured_outputs`, cached by the constraint), and the engine core compiles the same
grammar against the vocabulary (manager.py).
"""
from __future__ import annotations

import json
import re
from functools import lru_cache

from pagoda.sampling_params import StructuredOutputsParams


class GrammarError(ValueError):
    """The constraint does not parse; `field` names the StructuredOutputsParams field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


# xgrammar's errors start with "[hh:mm:ss] /path/file.cc:123: " and sometimes "Check failed: ..."
_NOISE = re.compile(r"^\[[\d:]+\]\s*\S+:\d+:\s*|Check failed: \(.*?\) is false:\s*")


def _clean(e: Exception) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    text = _NOISE.sub("", lines[0] if lines else type(e).__name__)
    return _NOISE.sub("", text).strip() or type(e).__name__


def _is_ebnf(text: str) -> bool:
    """EBNF (GBNF, `rule ::= ...`) rather than Lark (`rule: ...`), as vLLM tells them apart."""
    return re.search(r"^\s*[A-Za-z_][\w-]*\s*::=", text, re.MULTILINE) is not None


def choice_ebnf(choices: list[str]) -> str:
    """One of these strings exactly (JSON string escapes are EBNF literal escapes)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


# -------------------------------------------------------------------------- whitespace_pattern

_JSON_WS = "[ \\n\\r\\t]"   # how xgrammar's JSON-schema grammar spells a whitespace run: [ \n\r\t]*


def _tokens(ebnf: str) -> list[tuple[str, str]]:
    """EBNF text as (kind, text) pieces: "lit" (a "..." literal), "class" ([...]) or "code"."""
    out, i, start, n = [], 0, 0, len(ebnf)
    while i < n:
        c = ebnf[i]
        if c in "\"[":
            if i > start:
                out.append(("code", ebnf[start:i]))
            close = '"' if c == '"' else "]"
            j = i + 1
            while j < n and ebnf[j] != close:
                j += 2 if ebnf[j] == "\\" else 1
            out.append(("lit" if c == '"' else "class", ebnf[i:j + 1]))
            i = start = j + 1
        else:
            i += 1
    if start < n:
        out.append(("code", ebnf[start:]))
    return out


def with_whitespace(json_ebnf: str, pattern: str) -> str:
    """The JSON-schema grammar with every whitespace run replaced by `pattern` (a regex)."""
    import xgrammar as xgr
    try:
        ws = str(xgr.Grammar.from_regex(pattern))
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError for bad regexes
        raise GrammarError("whitespace_pattern", _clean(e)) from e
    pieces = _tokens(json_ebnf)
    out = []
    for k, (kind, text) in enumerate(pieces):
        nxt = pieces[k + 1] if k + 1 < len(pieces) else ("", "")
        if kind == "class" and text == _JSON_WS and nxt[0] == "code" and nxt[1].startswith("*"):
            out.append(" pagoda_ws ")
            pieces[k + 1] = ("code", nxt[1][1:])
        else:
            out.append(text)
    # the regex grammar's rules (root, root_1, ...) renamed into their own namespace
    renamed = "".join(re.sub(r"\broot(?=_\d|\b)", "pagoda_ws", t) if kind == "code" else t
                      for kind, t in _tokens(ws))
    return "".join(out) + "\n" + renamed


_HEX_AFTER_BYTE = re.compile(r"(\\x[0-9a-fA-F]{2})(?=[0-9a-fA-F])")


def _split_byte_escapes(g):
    r"""Work around xgrammar 0.2's printing of literals: a character below U+0100 is printed as
    `\xHH`, and when a hex digit follows it in the same literal ("ü" then "b" in "über") the
    grammar is re-read with the wrong character, so the literal can never match. Splitting the
    literal there ("\xfc" "ber") keeps its meaning."""
    import xgrammar as xgr
    text = str(g)
    if not _HEX_AFTER_BYTE.search(text):
        return g
    fixed = "".join(_HEX_AFTER_BYTE.sub(r'\1" "', t) if kind == "lit" else t for kind, t in _tokens(text))
    try:
        return xgr.Grammar.from_ebnf(fixed)
    except Exception:  # noqa: BLE001 - keep the grammar as it was
        return g


# ------------------------------------------------------------------------------------ grammars

def build_grammar(so: StructuredOutputsParams, any_whitespace: bool = True):
    return _split_byte_escapes(_build_grammar(so, any_whitespace))


def _build_grammar(so: StructuredOutputsParams, any_whitespace: bool = True):
    """The constraint as an xgrammar Grammar; GrammarError naming the field if it does not parse.
    `any_whitespace=False` (the engine's --structured-outputs-config disable_any_whitespace, or
    the request's own) makes JSON compact."""
    import xgrammar as xgr
    kind = so.kind
    try:
        if kind == "json":
            schema = so.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise GrammarError("json", f"the schema is not valid JSON ({e})") from None
            if not isinstance(schema, (dict, bool)):
                raise GrammarError("json", "the schema must be a JSON object")
            text = json.dumps(schema, ensure_ascii=False)
            compact = so.disable_any_whitespace or not any_whitespace
            g = xgr.Grammar.from_json_schema(text, any_whitespace=not compact,
                                             separators=(",", ":") if compact else None)
            if so.whitespace_pattern is not None and not compact:
                g = xgr.Grammar.from_ebnf(with_whitespace(str(g), so.whitespace_pattern))
            return g
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', strict_mode=False,
                                                any_whitespace=not so.disable_any_whitespace)
        if kind == "regex":
            return xgr.Grammar.from_regex(so.regex)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(choice_ebnf(so.choice))
        if kind == "grammar":
            if _is_ebnf(so.grammar):
                return xgr.Grammar.from_ebnf(so.grammar)
            return xgr.Grammar.from_lark(so.grammar)
        if kind == "structural_tag":
            return xgr.Grammar.from_structural_tag(so.structural_tag)
    except GrammarError:
        raise
    except Exception as e:  # noqa: BLE001 - xgrammar reports every parse error as RuntimeError
        raise GrammarError(kind, _clean(e)) from e
    raise GrammarError(kind, f"unknown constraint kind {kind!r}")


def from_key(key: tuple) -> StructuredOutputsParams:
    """The params back from their key (what compilations are cached by)."""
    kind, spec, no_ws, ws_pattern = key
    value = {"choice": lambda: json.loads(spec), "json_object": lambda: True}.get(kind, lambda: spec)()
    return StructuredOutputsParams(**{kind: value}, disable_any_whitespace=no_ws,
                                   whitespace_pattern=ws_pattern)


@lru_cache(maxsize=512)
def _validate(key: tuple) -> None:
    build_grammar(from_key(key))


def validate_structured_outputs(so: StructuredOutputsParams) -> None:
    """Raise GrammarError (a ValueError naming the field) if the constraint does not parse.
    Cached by the constraint: a schema sent again is not parsed again."""
    _validate(so.key())
