"""The typed-call policy (serve/typed_calls.py) and how the pipeline applies it."""

import json

import jsonschema
import pytest

pytest.importorskip("litellm")

from mtllm_locally import EngineConfig  # noqa: E402
from mtllm_locally.serve import typed_calls  # noqa: E402
from mtllm_locally.serve.pipeline import CallRequest  # noqa: E402
from mtllm_locally.serve.runtime import Runtime  # noqa: E402


def rf(schema):
    return {"type": "json_schema", "json_schema": {"name": "T", "schema": schema, "strict": True}}


ITEM = {"type": "object", "properties": {"name": {"type": "string"}, "quantity": {"type": "integer"}},
        "required": ["name", "quantity"]}
TICKET = {"type": "object", "properties": {"customer": {"type": "string"}, "urgent": {"type": "boolean"},
                                           "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}},
          "required": ["customer", "urgent", "items"], "$defs": {"Item": ITEM}}


def test_budget_grows_with_the_shape_and_stays_bounded():
    enum = typed_calls.budget(rf({"type": "string", "enum": ["A", "B"]}), None)
    flat = typed_calls.budget(rf(ITEM), None)
    nested = typed_calls.budget(rf(TICKET), None)
    assert typed_calls.MIN_BUDGET == enum <= flat < nested <= typed_calls.MAX_BUDGET
    # the $ref was followed: a list of items needs room for several of them
    assert nested > 2 * flat
    capped = typed_calls.budget(rf({"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 8}}), None)
    assert capped == typed_calls.MIN_BUDGET
    huge = {"type": "object", "properties": {f"f{i}": {"type": "array", "items": TICKET} for i in range(20)},
            "$defs": TICKET["$defs"]}
    assert typed_calls.budget(rf(huge), None) == typed_calls.MAX_BUDGET
    tools = [{"type": "function", "function": {"name": "f", "parameters": ITEM}}]
    assert typed_calls.MIN_BUDGET <= typed_calls.budget(None, tools) <= flat + 32


def test_budget_survives_odd_schemas():
    for schema in ({"$ref": "#/$defs/missing"}, {"type": ["string", "null"]}, {"anyOf": [ITEM, {"type": "null"}]},
                   {"type": "array"}, {"properties": {"a": {"$ref": "#/$defs/A"}}, "$defs": {"A": {"$ref": "#/$defs/A"}}}):
        assert typed_calls.MIN_BUDGET <= typed_calls.budget(rf(schema), None) <= typed_calls.MAX_BUDGET
    assert typed_calls.budget({"type": "json_object"}, None) >= typed_calls.MIN_BUDGET
    # a recursive schema that branches: 2**32 paths to depth 32; the estimate visits a bounded number
    tree = {"$ref": "#/$defs/T", "$defs": {"T": {"type": "object", "properties": {
        "left": {"$ref": "#/$defs/T"}, "right": {"$ref": "#/$defs/T"}}}}}
    assert typed_calls.budget(rf(tree), None) == typed_calls.MAX_BUDGET
    assert typed_calls.budget(rf({"type": "object", "properties": ["a", "b"]}), None) >= typed_calls.MIN_BUDGET
    assert typed_calls.budget(rf({"enum": [{1, 2}]}), None) == typed_calls.MAX_BUDGET  # unreadable: the cap
    assert typed_calls.budget(None, [{"function": {"parameters": "nope"}}, "x"]) >= typed_calls.MIN_BUDGET
    bad_defs = {"$ref": "#/$defs/A", "$defs": ["not", "a", "mapping"]}
    assert typed_calls.budget(rf(bad_defs), None) >= typed_calls.MIN_BUDGET


def test_retries_sample_with_another_seed():
    s2, t2 = typed_calls.retry_sampling({"max_tokens": 9}, 0.0, 2)
    s3, t3 = typed_calls.retry_sampling({"max_tokens": 9, "seed": 5}, 0.9, 3)
    assert t2 == typed_calls.RETRY_TEMPERATURE and t3 == 0.9 and s2["max_tokens"] == 9
    assert s2["seed"] != s3["seed"] and s3["seed"] == (5 + 7919 * 3) % (2**32 - 1)


def test_pipeline_applies_the_policy_and_the_store_marks_attempts(tmp_path, tiny_model_path, monkeypatch):
    seen = []
    with Runtime(store_path=tmp_path / "s.sqlite3", engine_config=EngineConfig(n_ctx=1024, flash_attn=False)) as rt:
        eng = rt.engines.get(tiny_model_path)
        real_submit = eng.submit

        def spy(*a, **kw):
            seen.append(kw)
            return real_submit(*a, **kw)

        monkeypatch.setattr(eng, "submit", spy)
        req = CallRequest(model=tiny_model_path, messages=[{"role": "user", "content": "a ticket"}],
                          response_format=rf(TICKET), sampling={"temperature": 0.7},
                          metadata={"jac_caller_name": "summarize", "jac_invocation_id": "inv-1"})
        first = rt.calls.complete(req)
        second = rt.calls.complete(req)  # byllm asks again: its check rejected the first answer
        for answer in (first, second):
            jsonschema.validate(json.loads(answer.choices[0].text), TICKET)
        budget = typed_calls.budget(rf(TICKET), None)
        assert [kw["max_tokens"] for kw in seen] == [budget, budget]
        assert all(kw["loop_guard"] is True for kw in seen)
        assert seen[0]["temperature"] == 0.0 and seen[1]["temperature"] == typed_calls.RETRY_TEMPERATURE
        assert seen[0].get("seed") is None and seen[1]["seed"] == 7919 * 2
        turns = rt.store().turns("inv-1")
        assert [t["attempt"] for t in turns] == [1, 2]
        assert all(t["closed_by"] in (None, "budget", "loop") for t in turns)
        assert all(t["completion_tokens"] <= budget for t in turns)
        # the program's own bound wins, and free text is left alone
        seen.clear()
        rt.calls.complete(CallRequest(**{**req.__dict__, "sampling": {"max_tokens": 40},
                                         "metadata": {"jac_invocation_id": "inv-2"}}))
        rt.calls.complete(CallRequest(model=tiny_model_path, messages=[{"role": "user", "content": "hi"}]))
        assert seen[0]["max_tokens"] == 40 and seen[0]["loop_guard"] is True
        assert "loop_guard" not in seen[1] and "max_tokens" not in seen[1]


def test_the_guard_can_be_switched_off(tmp_path, tiny_model_path, monkeypatch):
    monkeypatch.setenv("MTLLM_LOCALLY_TYPED_GUARD", "0")
    with Runtime(store_path=tmp_path / "s.sqlite3", engine_config=EngineConfig(n_ctx=1024)) as rt:
        assert rt.settings.typed_guard is False
        call = rt.calls.prepare(CallRequest(model=tiny_model_path, messages=[{"role": "user", "content": "x"}],
                                            response_format=rf(ITEM),
                                            metadata={"jac_caller_name": "f", "jac_invocation_id": "i"}))
        assert "max_tokens" not in call.sampling and "loop_guard" not in call.sampling and call.attempt == 1
        assert call.sampling["close_at_budget"] is False
        rt.calls.complete(CallRequest(model=tiny_model_path, messages=[{"role": "user", "content": "x"}],
                                      response_format=rf(ITEM), sampling={"max_tokens": 30},
                                      metadata={"jac_caller_name": "f", "jac_invocation_id": "i"}))
        again = rt.calls.prepare(CallRequest(model=tiny_model_path, messages=[{"role": "user", "content": "x"}],
                                             response_format=rf(ITEM), sampling={"temperature": 0.0},
                                             metadata={"jac_caller_name": "f", "jac_invocation_id": "i"}))
        assert again.attempt == 2 and again.temperature == 0.0  # marked, not varied, with the guard off
