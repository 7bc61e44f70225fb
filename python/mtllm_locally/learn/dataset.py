"""A task's examples, read from the store.

One example per accepted model turn: the prompt messages, the tools and
response_format it was served with, and the completion the model should produce.
Feedback rules: a correction replaces the output of the call's final turn, a call
marked wrong is left out, a confirmation marks it verified. Examples are
deduplicated by input (the latest, best-vouched one wins) and split by a hash of the
input, so an input that is held out once is held out forever and is never trained on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..chat import tool_call_text
from ..state.store import Store

# Which example wins when one input was seen several times.
RANK = MappingProxyType({"corrected": 3, "confirmed": 2, "teacher": 1, "model": 0})


@dataclass(frozen=True)
class Example:
    invocation_id: str
    input_key: str
    messages: list
    tools: list | None
    response_format: Any
    completion: str
    label: str                    # corrected | confirmed | teacher | model
    created_at: float
    heldout: bool

    @property
    def labelled(self) -> bool:
        return self.label != "model"

    def as_training(self) -> dict:
        return {"messages": self.messages, "tools": self.tools, "response_format": self.response_format,
                "completion": self.completion}


def input_key(messages: list, tools: Any, response_format: Any) -> str:
    blob = json.dumps([messages, tools, response_format], sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def is_heldout(key: str, percent: int) -> bool:
    return int(key[:8], 16) % 100 < percent


def _schema(response_format: Any) -> dict | None:
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        return (response_format.get("json_schema") or {}).get("schema")
    return None


def completion_for(value: Any, response_format: Any) -> str:
    """A corrected output (a Python value or its JSON) as the text the constrained
    engine would emit: compact JSON, byllm's `schema_object_wrapper` added when the
    schema has it and the value lacks it, keys in schema order."""
    schema = _schema(response_format)
    is_json = isinstance(response_format, dict) and response_format.get("type") in ("json_schema", "json_object")
    if not is_json:
        return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    props = (schema or {}).get("properties") or {}
    if list(props) == ["schema_object_wrapper"] and not (isinstance(value, dict) and "schema_object_wrapper" in value):
        value = {"schema_object_wrapper": value}
    if isinstance(value, dict) and props:
        value = {**{k: value[k] for k in props if k in value}, **value}
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _turn_completion(turn: dict) -> str | None:
    if turn["tool_calls_json"]:
        calls = json.loads(turn["tool_calls_json"])
        return "\n".join(tool_call_text(c, compact=True) for c in calls) if calls else None
    return turn["output_text"]


def task_examples(store: Store, task_key: str, *, heldout_percent: int = 20, train_on: str = "labelled",
                  until: float | None = None) -> list[Example]:
    """Every usable example of a task (`until`: only calls made before this time)."""
    calls = store.rows(
        "SELECT invocation_id, created_at, accepted, source FROM calls WHERE task_key=? AND created_at<=? "
        "ORDER BY created_at", (task_key, until if until is not None else 1e18))
    feedback = {}
    for f in store.rows("SELECT f.* FROM feedback f JOIN calls c ON c.invocation_id=f.invocation_id "
                        "WHERE c.task_key=? ORDER BY f.id", (task_key,)):
        feedback[f["invocation_id"]] = f  # the latest feedback on a call counts
    best: dict[str, Example] = {}
    for call in calls:
        inv = call["invocation_id"]
        fb = feedback.get(inv)
        if fb is not None and fb["correct"] == 0 and fb["corrected_output"] is None:
            continue  # marked wrong, no correction
        if fb is None and call["accepted"] == 0:
            continue  # byllm could not use the output
        turns = store.turns(inv)
        for t in turns:
            last = t["turn_index"] == turns[-1]["turn_index"]
            if not last and t["finish_reason"] != "tool_calls":
                continue  # a rejected attempt before a retry
            completion = _turn_completion(t)
            label = "teacher" if (t["source"] or "").startswith("teacher:") else "model"
            response_format = json.loads(t["response_format_json"]) if t["response_format_json"] else None
            if last and fb is not None:
                if fb["corrected_output"] is not None:
                    completion, label = completion_for(fb["corrected_output"], response_format), "corrected"
                elif fb["correct"] == 1:
                    label = "confirmed"
            if completion is None:
                continue
            if response_format and label != "corrected":
                # a teacher may space its JSON; the engine emits it compact, so train on that
                completion = completion_for(completion, response_format)
            if label == "model" and (train_on == "labelled" or call["accepted"] != 1):
                continue  # the model's own output, not vouched for (byllm's verdict is the least)
            messages = json.loads(t["messages_json"])
            tools = json.loads(t["tools_json"]) if t["tools_json"] else None
            key = input_key(messages, tools, response_format)
            ex = Example(inv, key, messages, tools, response_format, completion, label, call["created_at"],
                         is_heldout(key, heldout_percent))
            old = best.get(key)
            if old is None or (RANK[ex.label], ex.created_at) >= (RANK[old.label], old.created_at):
                best[key] = ex
    return sorted(best.values(), key=lambda e: e.created_at)


def split(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    return [e for e in examples if not e.heldout], [e for e in examples if e.heldout]


def snapshot(examples: list[Example]) -> dict:
    """What a registry entry records about the data it was trained and judged on."""
    train, heldout = split(examples)
    digest = hashlib.sha256("".join(e.input_key + e.completion for e in examples).encode()).hexdigest()[:16]
    return {"n_train": len(train), "n_heldout": len(heldout), "sha256": digest,
            "newest_call": max((e.created_at for e in examples), default=None),
            "labels": {k: sum(e.label == k for e in examples) for k in RANK}}
