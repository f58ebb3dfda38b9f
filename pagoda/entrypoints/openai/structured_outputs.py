"""Request fields -> the engine's StructuredOutputsParams, and forced tool calls.

A request constrains its output with at most one of: OpenAI's `response_format`
(json_schema / json_object / text), vLLM's `structured_outputs` object, or vLLM's older
`guided_json / guided_regex / guided_choice / guided_grammar`; or, in chat, with
`tool_choice: "required"` / a named function, which become a JSON schema built from the tools'
parameters (as vLLM does): a named call's output is its arguments, a required call's output is
a JSON list of `{"name", "parameters"}` objects. Every constraint is parsed here, off the event
loop and cached, so one that does not parse is a 400 naming the request field it came from.
"""
from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

from pagoda.sampling_params import StructuredOutputsParams
from pagoda.structured_output.grammar import GrammarError, validate_structured_outputs

from .errors import OpenAIError
from .protocol import SamplingFields


# Parsing runs here, two at a time: a constraint that takes long to build (xgrammar expands
# `a{100000}`) holds up other constrained requests' checks, never the event loop or other requests.
_CHECKS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pagoda-grammar-check")


@dataclass
class Constraint:
    params: StructuredOutputsParams
    # StructuredOutputsParams field -> the request field it came from (what an error names)
    fields: dict[str, str] = field(default_factory=dict)


def _params(param: str, **kw) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kw)
    except ValueError as e:
        raise OpenAIError(f"{param}: {e}", param=param) from e


def from_request(req: SamplingFields) -> Optional[Constraint]:
    """The request's constraint, or None; 400 when it sets more than one."""
    found: list[Constraint] = []
    ws = req.guided_whitespace_pattern
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(Constraint(_params("response_format", json_object=True), {"json_object": "response_format"}))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise OpenAIError("response_format: type json_schema needs json_schema.schema.",
                              param="response_format.json_schema")
        found.append(Constraint(_params("response_format", json=rf.json_schema.schema_),
                                {"json": "response_format.json_schema.schema"}))
    so = req.structured_outputs
    if so is not None:
        kw = {"json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar,
              "json_object": so.json_object, "structural_tag": so.structural_tag}
        params = _params("structured_outputs", **{k: v for k, v in kw.items() if v is not None},
                         disable_any_whitespace=so.disable_any_whitespace,
                         whitespace_pattern=so.whitespace_pattern or ws)
        names = {k: f"structured_outputs.{k}" for k in kw}
        names["whitespace_pattern"] = ("structured_outputs.whitespace_pattern" if so.whitespace_pattern
                                       else "guided_whitespace_pattern")
        found.append(Constraint(params, names))
    for kind in ("json", "regex", "choice", "grammar"):
        value = getattr(req, f"guided_{kind}")
        if value is not None:
            found.append(Constraint(_params(f"guided_{kind}", **{kind: value}, whitespace_pattern=ws),
                                    {kind: f"guided_{kind}", "whitespace_pattern": "guided_whitespace_pattern"}))
    if len(found) > 1:
        names = [next(iter(c.fields.values())).split(".")[0] for c in found]
        raise OpenAIError(f"only one kind of structured output may be set, got {', '.join(names)}.",
                          param=names[1])
    return found[0] if found else None


async def validated(c: Optional[Constraint]) -> Optional[StructuredOutputsParams]:
    """The constraint's params once it parses (checked in a worker thread: a large schema never
    stalls the event loop); a GrammarError becomes a 400 naming the request's field."""
    if c is None:
        return None
    try:
        await asyncio.get_running_loop().run_in_executor(_CHECKS, validate_structured_outputs, c.params)
    except GrammarError as e:
        param = c.fields.get(e.field, e.field)
        raise OpenAIError(f"{param}: {e.reason}", param=param) from e
    return c.params


# --------------------------------------------------------------------------- forced tool calls

def _tool_functions(tools: Optional[list]) -> list[dict]:
    fns = []
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise OpenAIError(f"tools[{i}]: a tool is {{\"type\": \"function\", \"function\": "
                              "{\"name\": ..., \"parameters\": {...}}}.", param=f"tools.{i}")
        fns.append(fn)
    return fns


def _parameters(fn: dict) -> dict:
    return fn.get("parameters") or {"type": "object", "properties": {}}


@dataclass
class ForcedTools:
    """tool_choice "required" (`name` None) or a named function: what the grammar makes the
    model write, and how that becomes tool calls."""
    name: Optional[str]
    constraint: Constraint

    def calls(self, text: str) -> Optional[list[tuple[str, Any]]]:
        """(name, arguments) of each call in the output, or None when it is not whole (cut off
        by max_tokens, say)."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        if self.name is not None:
            return [(self.name, value)] if isinstance(value, dict) else None
        if not isinstance(value, list) or not value:
            return None
        out = []
        for item in value:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return None
            out.append((item["name"], item.get("parameters", {})))
        return out


def forced_tools(tools: Optional[list], tool_choice: Any, parallel: bool = True) -> Optional[ForcedTools]:
    """ForcedTools for tool_choice "required" or {"type": "function", "function": {"name"}};
    None for none / auto. 400 naming tool_choice when it does not fit the tools."""
    named = isinstance(tool_choice, dict)
    if not named and tool_choice != "required":
        return None
    fns = _tool_functions(tools)
    if not fns:
        raise OpenAIError("tool_choice: 'required' or a named function needs `tools`.", param="tool_choice")
    if named:
        name = (tool_choice.get("function") or {}).get("name") if tool_choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise OpenAIError('tool_choice: a named tool choice is {"type": "function", "function": '
                              '{"name": ...}}.', param="tool_choice")
        fn = next((f for f in fns if f["name"] == name), None)
        if fn is None:
            raise OpenAIError(f"tool_choice: no tool named {name!r} in tools.", param="tool_choice")
        i = fns.index(fn)
        return ForcedTools(name, Constraint(_params("tools", json=_parameters(fn)),
                                            {"json": f"tools.{i}.function.parameters"}))
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": [
        {"type": "object", "properties": {"name": {"type": "string", "enum": [f["name"]]},
                                          "parameters": _parameters(f)},
         "required": ["name", "parameters"]} for f in fns]}}
    if not parallel:
        schema["maxItems"] = 1
    return ForcedTools(None, Constraint(_params("tools", json=schema), {"json": "tools"}))
