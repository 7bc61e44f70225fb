"""OpenAI-style `response_format` and `tools` -> a grammar the engine enforces.

The engine compiles the grammar with llguidance (see cpp/constraint.h) when the
request is submitted, so an unsupported schema fails right there with
InvalidRequestError, before any token is generated.

Tool calls are emitted as one JSON object `{"name": <tool>, "arguments": {...}}`
whose name is one of the tools and whose arguments validate against that tool's
`parameters` schema.
"""

from __future__ import annotations

import ast
import functools
import glob
import importlib.util
import json
import os
import re
import reprlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import InvalidRequestError


@dataclass(frozen=True)
class Grammar:
    kind: str   # "json_schema" | "regex" | "lark"
    data: str

    def __post_init__(self):
        if self.kind not in ("json_schema", "regex", "lark"):
            raise InvalidRequestError(f"grammar kind must be json_schema, regex or lark, not {reprlib.repr(self.kind)}")
        if not isinstance(self.data, str):
            raise InvalidRequestError(f"grammar text must be a str, not {type(self.data).__name__}")
        if "\x00" in self.data:
            raise InvalidRequestError("grammar text contains a NUL character")


@functools.lru_cache(maxsize=1)
def guidance_library() -> str:
    """Path of llguidance's shared library (its wheel exports the C API)."""
    spec = importlib.util.find_spec("llguidance")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidRequestError("constrained decoding needs the `llguidance` package")
    libs = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_lib*.so"))
    if not libs:
        raise InvalidRequestError("the installed llguidance package has no shared library")
    return libs[0]


# Compact JSON (no free whitespace between tokens): fewer tokens per answer, and a
# small model cannot wander off into endless indentation.
GUIDANCE_OPTIONS = {"whitespace_flexible": False}

_BYLLM_ENUM_HINT = re.compile(r"The value \*should\* be one in this list: (\[.*?\])")


MAX_SCHEMA_DEPTH = 64  # nesting of a JSON schema; deeper ones are refused, not recursed into


def _with_byllm_enums(node: Any, depth: int = 0) -> Any:
    """byllm describes an enum return type as {"type": "integer", "description":
    "...The value *should* be one in this list: [1, 2]"} without an `enum` keyword;
    we add the keyword so the output is a member, not just an integer."""
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidRequestError(f"JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(node, list):
        return [_with_byllm_enums(n, depth + 1) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _with_byllm_enums(v, depth + 1) for k, v in node.items()}
    desc = out.get("description")
    if "enum" not in out and out.get("type") in ("integer", "string") and isinstance(desc, str):
        m = _BYLLM_ENUM_HINT.search(desc)
        if m:
            try:
                values = ast.literal_eval(m.group(1))
            except (ValueError, SyntaxError):
                values = None
            want = int if out["type"] == "integer" else str
            if isinstance(values, list) and values and all(type(v) is want for v in values):
                out["enum"] = values
    return out


def _schema_text(schema: Any) -> str:
    try:
        return _schema_text_checked(schema)
    except RecursionError:
        raise InvalidRequestError(f"JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels") from None
    except (TypeError, ValueError) as e:  # json.dumps of non-JSON values, circular references
        if isinstance(e, InvalidRequestError):
            raise
        raise InvalidRequestError(f"JSON schema is not JSON-serializable: {e}") from None


def _schema_text_checked(schema: Any) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"JSON schema is not valid JSON: {e}") from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"JSON schema must be an object, not {type(schema).__name__}")
    schema = _with_byllm_enums(schema)
    schema.setdefault("x-guidance", GUIDANCE_OPTIONS)
    return json.dumps(schema, allow_nan=False)


def from_response_format(rf: Mapping[str, Any] | None) -> Grammar | None:
    if rf is None:
        return None
    if hasattr(rf, "model_dump"):  # a pydantic model instance passed through LiteLLM
        rf = rf.model_dump()
    if not isinstance(rf, Mapping):
        raise InvalidRequestError("response_format must be a mapping")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar("json_schema", _schema_text({"type": "object"}))
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, Mapping) or "schema" not in js:
            raise InvalidRequestError("response_format json_schema needs {'json_schema': {'schema': ...}}")
        return Grammar("json_schema", _schema_text(js["schema"]))
    raise InvalidRequestError(f"unsupported response_format type {reprlib.repr(kind)} (text, json_object, json_schema)")


def tool_call_schema(tools: Sequence[Mapping[str, Any]], only: str | None = None) -> dict:
    options = []
    for t in tools:
        fn = t.get("function", t) if isinstance(t, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise InvalidRequestError(f"malformed tool: {reprlib.repr(t)}")
        if only is not None and fn["name"] != only:
            continue
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    if not options:
        raise InvalidRequestError(f"tool_choice names a tool that is not in tools: {reprlib.repr(only)}")
    return options[0] if len(options) == 1 else {"anyOf": options}


def from_tools(tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any = "auto") -> Grammar | None:
    """`required` / a named tool: output must be a call. `auto`: a call or plain text
    that does not start with '{'. `none`: unconstrained."""
    if not tools:
        return None
    if tool_choice in (None, "auto", "required", "none"):
        only = None
    elif isinstance(tool_choice, Mapping) and isinstance(tool_choice.get("function"), Mapping):
        only = tool_choice["function"].get("name")
    else:
        raise InvalidRequestError(f"unsupported tool_choice {reprlib.repr(tool_choice)}")
    if tool_choice == "none":
        return None
    schema = _schema_text(tool_call_schema(tools, only))
    if tool_choice in (None, "auto"):
        return Grammar("lark", f"start: call | TEXT\ncall: %json {schema}\nTEXT: /[^{{\\s][^\\x00]*/\n")
    return Grammar("json_schema", schema)
