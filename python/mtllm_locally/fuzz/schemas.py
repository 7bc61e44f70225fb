"""JSON schemas and tool lists, through response_format, tools and grammar=.

Deep nesting (deeper than Python's and Rust's recursion limits), huge enums and
unions, recursive and dangling $refs, keywords of the wrong type, invalid regex
patterns, gigantic strings, values JSON cannot hold. A schema the engine cannot
compile must fail at submit with InvalidRequestError.
"""

from __future__ import annotations

import random

from .. import constraints
from .context import DRIVES, HELLO, drive
from .corpus import short

NAN, INF = float("nan"), float("inf")


def _deep(kind: str, depth: int):
    node = {"type": "string"}
    for _ in range(depth):
        if kind == "object":
            node = {"type": "object", "properties": {"a": node}, "required": ["a"]}
        elif kind == "array":
            node = {"type": "array", "items": node, "minItems": 1}
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


def _deep_text(kind: str, depth: int) -> str:
    """The same schema as JSON text, built without recursion."""
    head, tail = {"object": ('{"type":"object","required":["a"],"properties":{"a":', "}}"),
                  "array": ('{"type":"array","minItems":1,"items":', "}"),
                  "anyOf": ('{"anyOf":[{"type":"null"},', "]}")}[kind]
    return head * depth + '{"type":"string"}' + tail * depth


def s_deep(r):
    kind, depth = r.choice(("object", "array", "anyOf")), r.choice((50, 200, 1000, 5000, 50000))
    return "deep_nesting", f"{kind} nested {depth} deep", _deep(kind, depth), _deep_text(kind, depth)


def s_enum(r):
    n, width = r.choice(((1000, 1000), (10000, 10), (10000, 1000), (100000, 1), (100000, 10)))
    values = [f"v{i}" + "x" * width for i in range(n)] if r.random() < 0.7 else list(range(n))
    return "huge_enum", f"enum of {n} values ({width}-char)", {"enum": values}


def s_union(r):
    n = r.choice((100, 1000, 10000))
    key = r.choice(("anyOf", "oneOf", "allOf"))
    return "huge_union", f"{key} of {n} object branches", {
        key: [{"type": "object", "properties": {f"k{i}": {"const": i}}, "required": [f"k{i}"]} for i in range(n)]}


def s_ref(r):
    which = r.choice(("self", "mutual", "dangling", "external", "root-array", "deep-pointer", "bad-pointer"))
    schema = {
        "self": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        "mutual": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        "dangling": {"$ref": "#/$defs/missing"},
        "external": {"$ref": "http://127.0.0.1:9/schema.json"},
        "root-array": {"type": "array", "items": {"$ref": "#"}},
        "deep-pointer": {"$ref": "#/" + "/".join(["x"] * 10000)},
        "bad-pointer": {"$ref": "#/$defs/%zz~2"},
    }[which]
    return "ref", f"$ref {which}", schema


def s_bad_keywords(r):
    k, v = r.choice((
        ("type", "foo"), ("type", 5), ("type", ["string", 7]), ("type", []), ("minimum", "zero"),
        ("minLength", -1), ("maxLength", 2**64), ("minLength", 10**9), ("minItems", 5), ("pattern", "("),
        ("pattern", "a{99999999}"), ("pattern", "(?<=a)b"), ("pattern", "\\"), ("format", "bogus"),
        ("required", "a"), ("properties", ["a"]), ("additionalProperties", "x"), ("items", 5),
        ("enum", []), ("enum", "abc"), ("const", NAN), ("minimum", INF), ("multipleOf", 0), ("multipleOf", -1),
        ("maximum", -INF), ("$schema", 5), ("x-guidance", "x"), ("x-guidance", {"lenient": "x"}),
        ("minItems", 2**40), ("maxProperties", -1), ("if", {"type": "string"}), ("not", {}),
        ("dependentSchemas", {"a": 5}), ("prefixItems", [{"type": "string"}] * 1000),
    ))
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    if k == "minItems" and v == 5:
        schema = {"type": "array", "minItems": 5, "maxItems": 2}
        return "bad_keywords", "minItems > maxItems", schema
    schema["properties"]["a"] = {"type": "string", k: v} if k in ("pattern", "minLength", "maxLength", "format") \
        else {k: v}
    return "bad_keywords", f"{k}={short(v, 60)}", schema


def s_gigantic(r):
    n = r.choice((1 << 16, 1 << 20, 1 << 23))
    where = r.choice(("description", "property name", "const", "enum member", "pattern"))
    s = "é" * n if r.random() < 0.3 else "a" * n
    schema = {"description": s} if where == "description" else \
        {"type": "object", "properties": {s: {"type": "string"}}, "required": [s]} if where == "property name" else \
        {"const": s} if where == "const" else {"enum": [s, "b"]} if where == "enum member" else \
        {"type": "string", "pattern": s}
    return "gigantic_string", f"{len(s)}-char {where}", schema


def s_not_a_schema(r):
    v = r.choice((None, 5, [], ["a"], "not json {", "[1,2]", True, False, NAN, b"{}", {1: "a"},
                  {"type": "object", "properties": {"a": {"type": "string", "x": {1, 2}}}}, {"\udcff": {}},
                  {"type": "string", "description": "\0\ud800"}))
    return "not_a_schema", f"schema={short(v, 60)}", v


def s_valid_edge(r):
    schema = r.choice(({}, {"type": "object"}, {"type": "string", "minLength": 1000},
                       {"type": "array", "items": {"type": "integer"}, "minItems": 100},
                       {"type": "number", "minimum": 1e308}, {"type": "integer", "minimum": 2**63},
                       {"type": "string", "format": "date-time"}, {"type": "string", "pattern": "^(a+)+$"},
                       {"oneOf": [{"type": "string"}, {"type": "string"}]}))
    return "valid_edge", f"schema={short(schema, 80)}", schema


SCHEMAS = (s_deep, s_deep, s_enum, s_union, s_ref, s_bad_keywords, s_bad_keywords, s_gigantic, s_not_a_schema,
           s_valid_edge)


def _tools(r, schema):
    how = r.choice(("params", "malformed", "many", "choice"))
    if how == "params":
        return "tools", [{"type": "function", "function": {"name": "f", "parameters": schema}}], r.choice(
            ("auto", "required", None))
    if how == "malformed":
        t = r.choice(([5], [{"type": "function"}], [{"function": {"name": 5}}], "f", {"a": 1},
                      [{"type": "function", "function": {"name": "f", "parameters": "x"}}]))
        return "tools_malformed", t, "required"
    if how == "many":
        n = r.choice((100, 2000))
        return "tools_many", [{"type": "function", "function": {"name": f"f{i}", "parameters": {}}}
                              for i in range(n)], "required"
    choice = r.choice(("bogus", 5, {"function": {"name": "nope"}}, {"function": 5}, {"type": "function"}, []))
    return "tool_choice", [{"type": "function", "function": {"name": "f", "parameters": schema}}], choice


def make(r: random.Random):
    label, desc, schema, *text = r.choice(SCHEMAS)(r)
    route = r.choice(("response_format", "response_format", "grammar", "tools", "json_object", "rf_shape"))
    how = r.choice(DRIVES)
    kw = {"max_tokens": r.choice((1, 8, 16))}
    if route == "response_format":
        kw["response_format"] = {"type": "json_schema", "json_schema": {"name": "S", "schema": schema}}
    elif route == "grammar":
        import json

        if not text:
            try:
                text = [json.dumps(schema, allow_nan=True)]
            except (TypeError, ValueError):
                text = [str(schema)[:1000]]  # not JSON: what a caller might pass by mistake
        kw["grammar"] = ("json_schema", text[0])  # built when the case runs
    elif route == "tools":
        tlabel, tools, choice = _tools(r, schema)
        label = tlabel if tlabel != "tools" else label
        kw["tools"], kw["tool_choice"] = tools, choice
        desc = f"{desc} as tool parameters, tool_choice={short(choice, 40)}" if tlabel == "tools" else \
            f"{tlabel}: tools={short(tools, 80)} tool_choice={short(choice, 40)}"
    elif route == "json_object":
        kw["response_format"] = {"type": "json_object", "schema": schema}
    else:
        kw["response_format"] = r.choice(({"type": "json_schema"}, {"type": "json_schema", "json_schema": schema},
                                          {"type": "bogus"}, "json", 5, [schema], {"type": None},
                                          {"type": "json_schema", "json_schema": {"schema": schema, "strict": "x"}}))
        label, desc = "response_format_shape", f"response_format={short(kw['response_format'], 80)}"

    def run(ctx):
        if "grammar" in kw:
            kw["grammar"] = constraints.Grammar(*kw["grammar"])
        drive(ctx.shared_engine(), how, messages=HELLO, **kw)

    return label, f"{desc} via {route}, {how}", run
