"""Typed results always complete: budget-aware closing and the loop guard (issue 13).

Constrained decoding alone guarantees a valid prefix; these tests check that the
value also closes inside max_tokens (and the context), down to the schema's own
minimum, on the tiny random model (nothing but the engine makes its output close)
and on the real default model."""

import concurrent.futures
import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtllm_locally import ContextOverflowError, InvalidRequestError, SamplingParams
from mtllm_locally.constraints import Grammar


def rf(schema, name="Out"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def minimum_tokens(engine, **constraint):
    """The shortest completion the engine finds from the grammar's start, read from
    the error a zero budget gets."""
    with pytest.raises(InvalidRequestError, match=r"max_tokens=0 is below the \d+ tokens") as e:
        engine.submit("x", max_tokens=0, **constraint)
    return int(re.search(r"below the (\d+) tokens", str(e.value)).group(1))


def check_complete(c, schema, max_tokens):
    value = json.loads(c.text)
    jsonschema.validate(value, schema)
    assert c.completion_tokens <= max_tokens, c
    assert c.finish_reason in ("stop", "length"), c
    assert c.closed_by in (None, "budget"), c
    if c.closed_by == "budget":
        assert c.finish_reason == "length", c
    return value


# ------------------------------------------------------------------ random schemas
NAMES = st.sampled_from(["id", "name", "kind", "score", "tags", "ok", "note", "items"])
leaf = st.one_of(
    st.integers(1, 40).map(lambda n: {"type": "string", "maxLength": n}),
    st.just({"type": "string"}),                                    # free: may run to the limit
    st.integers(1, 6).map(lambda n: {"type": "string", "minLength": n}),
    st.just({"type": "integer"}),
    st.tuples(st.integers(-50, 10), st.integers(11, 999)).map(lambda r: {"type": "integer", "minimum": r[0], "maximum": r[1]}),
    st.just({"type": "number"}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.sampled_from(["red", "green", "blue", "x y", "ünï"]), min_size=1, max_size=4, unique=True).map(
        lambda v: {"type": "string", "enum": v}),
)


def objects(children):
    return st.dictionaries(NAMES, children, min_size=1, max_size=4).flatmap(
        lambda props: st.sets(st.sampled_from(sorted(props))).map(
            lambda req: {"type": "object", "properties": props, "required": sorted(req), "additionalProperties": False}))


def arrays(children):
    return st.tuples(children, st.integers(0, 2), st.sampled_from([None, 3, 50])).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], **({"maxItems": t[2]} if t[2] else {})})


schemas = st.recursive(leaf, lambda children: st.one_of(objects(children), arrays(children),
                                                        st.tuples(children, children).map(lambda ab: {"anyOf": list(ab)})),
                       max_leaves=8)
object_schemas = schemas.map(lambda s: s if s.get("type") == "object" else {
    "type": "object", "properties": {"value": s}, "required": ["value"], "additionalProperties": False})


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=object_schemas, extra=st.sampled_from([0, 0, 1, 2, 5, 20, 60]), seed=st.integers(0, 2**31 - 1),
       temperature=st.sampled_from([0.0, 1.0]))
def test_every_budget_down_to_the_minimum_closes(tiny_engine, schema, extra, seed, temperature):
    need = minimum_tokens(tiny_engine, response_format=rf(schema))
    budget = need + extra
    c = tiny_engine.generate("Answer:", response_format=rf(schema), max_tokens=budget, seed=seed, temperature=temperature)
    check_complete(c, schema, budget)
    with pytest.raises(InvalidRequestError, match=f"max_tokens={need - 1} is below the {need} tokens this schema needs"):
        tiny_engine.submit("Answer:", response_format=rf(schema), max_tokens=need - 1)


ITEM = {"type": "object", "properties": {"name": {"type": "string"}, "quantity": {"type": "integer"}},
        "required": ["name", "quantity"], "additionalProperties": False}
TICKET = {"type": "object", "properties": {"customer": {"type": "string"}, "urgent": {"type": "boolean"},
                                           "items": {"type": "array", "items": ITEM}},
          "required": ["customer", "urgent", "items"], "additionalProperties": False}
INVOICE = {"type": "object", "properties": {"vendor": {"type": "string"}, "total": {"type": "number"},
                                            "date": {"type": "string"}},
           "required": ["vendor", "total", "date"], "additionalProperties": False}


def test_runaway_string_is_closed_by_the_budget(tiny_engine):
    # The random model never ends the free string by itself: without closing, every
    # one of these ran to max_tokens as unterminated JSON.
    need = minimum_tokens(tiny_engine, response_format=rf(TICKET))
    for budget in (need, need + 1, need + 7, 64, 200):
        c = tiny_engine.generate("Answer:", response_format=rf(TICKET), max_tokens=budget)
        value = check_complete(c, TICKET, budget)
        assert c.closed_by == "budget" and c.finish_reason == "length" and c.completion_tokens == budget, c
        assert value["items"] == [] or all(isinstance(i["quantity"], int) for i in value["items"])
    assert tiny_engine.stats()["closing_searches"] > 0


def test_context_limit_closes_too(tiny_engine):
    # Room left by the context (n_ctx=1024), not max_tokens, is what runs out here.
    need = minimum_tokens(tiny_engine, response_format=rf(TICKET))
    prompt = list(range(1000, 1000 + 1024 - need - 5))
    c = tiny_engine.generate(prompt, response_format=rf(TICKET), max_tokens=500)
    check_complete(c, TICKET, 500)
    assert c.prompt_tokens + c.completion_tokens <= 1024
    with pytest.raises(ContextOverflowError, match="this schema needs"):
        tiny_engine.submit(list(range(1000, 1000 + 1024 - need + 1)), response_format=rf(TICKET), max_tokens=500)


def test_tool_calls_close_within_the_budget(tiny_engine):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
        "required": ["query", "limit"], "additionalProperties": False}}}]
    need = minimum_tokens(tiny_engine, tools=tools, tool_choice="required")
    for budget in (need, need + 3, 40):
        c = tiny_engine.generate("Call:", tools=tools, tool_choice="required", max_tokens=budget, temperature=1.0, seed=budget)
        call = json.loads(c.text)
        assert call["name"] == "lookup" and set(call["arguments"]) == {"query", "limit"}
        assert c.completion_tokens <= budget


def test_regex_and_lark_close_within_the_budget(tiny_engine):
    pattern = r"[a-z]+@[a-z]+\.(com|org)"
    need = minimum_tokens(tiny_engine, grammar=Grammar("regex", pattern))
    for budget in (need, need + 2, 30):
        c = tiny_engine.generate("x", grammar=Grammar("regex", pattern), max_tokens=budget, temperature=1.0, seed=budget)
        assert re.fullmatch(pattern, c.text), c
        assert c.completion_tokens <= budget
    lark = 'start: "[" item ("," item)* "]"\nitem: /[a-z]{1,8}/'
    need = minimum_tokens(tiny_engine, grammar=Grammar("lark", lark))
    for budget in (need, 25):
        c = tiny_engine.generate("x", grammar=Grammar("lark", lark), max_tokens=budget, temperature=1.0, seed=1)
        assert re.fullmatch(r"\[[a-z]{1,8}(,[a-z]{1,8})*\]", c.text), c
        assert c.completion_tokens <= budget


@pytest.mark.parametrize("grammar", [
    Grammar("lark", 'start: "x" start'),           # every string is infinite
    Grammar("lark", 'start: "(" start ")"'),
    Grammar("regex", "a{20000}b"),                  # finite, but longer than the closing search looks
])
def test_grammar_without_a_finite_completion_is_a_clear_error(tiny_engine, grammar):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(tiny_engine.submit, "x", grammar=grammar, max_tokens=50)
        with pytest.raises(InvalidRequestError, match="has no completion the engine can find"):
            fut.result(timeout=60)  # never a hang


def test_sampling_params_validate_loop_guard():
    with pytest.raises(InvalidRequestError, match="loop_guard"):
        SamplingParams(loop_guard="yes")
    assert SamplingParams().loop_guard is False


def test_model_closed_values_report_no_closing(tiny_engine):
    schema = {"type": "object", "properties": {"k": {"type": "string", "enum": ["a", "b"]}}, "required": ["k"],
              "additionalProperties": False}
    c = tiny_engine.generate("x", response_format=rf(schema), max_tokens=50, loop_guard=True)
    assert c.finish_reason == "stop" and c.closed_by is None
    c = tiny_engine.generate("x", max_tokens=5, ignore_eos=True)
    assert c.finish_reason == "length" and c.closed_by is None


# ------------------------------------------------------------------ the real model
TICKET_MESSAGES = [
    {"role": "system", "content": "This is a task you must complete by returning only the output.\nDo not include any other text."},
    {"role": "user", "content": "summarize\nmessage: Hi, this is Dana from Acme. Our order #4521 arrived with 3 broken chairs "
                                "and a missing table. Please send replacements ASAP, we have an event on Friday.\nReturn type: Ticket"},
]


def test_default_model_list_of_objects_closes(default_engine):
    # Measured: greedy decoding repeats {"name":"Dana","quantity":N} items until the limit.
    for budget in (40, 96):
        c = default_engine.generate(messages=TICKET_MESSAGES, response_format=rf(TICKET), max_tokens=budget)
        value = check_complete(c, TICKET, budget)
        assert value["customer"].startswith("Dana")


def test_default_model_free_string_closes(default_engine):
    messages = [{"role": "user", "content": "Extract the invoice (vendor, total, date) and quote the whole email in "
                                            "the vendor field, word for word:\nFrom ACME Corp. Total due: $1,234.50 by "
                                            "2024-03-01. Thank you for your business, we appreciate it very much."}]
    for budget in (20, 24):
        c = default_engine.generate(messages=messages, response_format=rf(INVOICE), max_tokens=budget)
        check_complete(c, INVOICE, budget)


def test_loop_guard_closes_a_repetition_loop(default_engine):
    c = default_engine.generate(messages=TICKET_MESSAGES, response_format=rf(TICKET), max_tokens=256, loop_guard=True)
    value = json.loads(c.text)
    jsonschema.validate(value, TICKET)
    assert c.closed_by == "loop" and c.finish_reason == "stop", c
    assert 3 <= len(value["items"]) <= 10 and c.completion_tokens < 200
    off = default_engine.generate(messages=TICKET_MESSAGES, response_format=rf(TICKET), max_tokens=256)
    assert off.closed_by != "loop" and off.completion_tokens > c.completion_tokens


@pytest.mark.parametrize("schema,question", [
    ({"type": "object", "properties": {"values": {"type": "array", "items": {"type": "integer"}}},
      "required": ["values"], "additionalProperties": False}, "List the numbers from 1 to 10."),
    ({"type": "object", "properties": {"fruits": {"type": "array", "items": {
        "type": "object", "properties": {"name": {"type": "string"}, "color": {"type": "string"}},
        "required": ["name", "color"], "additionalProperties": False}}}, "required": ["fruits"], "additionalProperties": False},
     "Name three fruits and their colors: banana, apple, grape."),
    ({"type": "object", "properties": {"people": {"type": "array", "items": {
        "type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string"}},
        "required": ["id", "name"], "additionalProperties": False}}}, "required": ["people"], "additionalProperties": False},
     "Give ids to Ann, Bob and Cid, starting at 1."),
])
def test_loop_guard_leaves_legitimate_lists_alone(default_engine, schema, question):
    messages = [{"role": "user", "content": question}]
    default_engine.generate(messages=messages, response_format=rf(schema), max_tokens=120)  # warm the prefix cache
    off = default_engine.generate(messages=messages, response_format=rf(schema), max_tokens=120)
    on = default_engine.generate(messages=messages, response_format=rf(schema), max_tokens=120, loop_guard=True)
    assert on.closed_by is None and on.finish_reason == "stop", on
    assert on.text == off.text
    jsonschema.validate(json.loads(on.text), schema)
