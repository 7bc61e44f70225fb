"""The eval gate: a candidate adapter against the version serving the task now,
both run through the engine on the task's held-out examples, exactly as served
(same template adaptation, same constrained decoding, greedy).

Metric: exact match of the typed output (JSON compared as values, so key order and
spacing do not matter); for objects, the fraction of the expected fields that are
right, so a candidate that fixes one field of three still counts. The task's score
is the mean over held-out examples.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..demonstrations import Demonstration, with_demonstrations
from ..engine import Engine
from ..errors import MtllmError
from .dataset import Example


def _value(text: str) -> Any:
    try:
        v = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text.strip() if isinstance(text, str) else text
    if isinstance(v, dict) and list(v) == ["schema_object_wrapper"]:
        return v["schema_object_wrapper"]
    return v


def field_score(predicted: str, expected: str) -> tuple[bool, float]:
    """(exact match, fraction of expected fields right)."""
    p, e = _value(predicted), _value(expected)
    if p == e:
        return True, 1.0
    if isinstance(e, dict) and isinstance(p, dict) and e:
        return False, sum(p.get(k) == v for k, v in e.items()) / len(e)
    return False, 0.0


def field_hits(predicted: str, expected: str) -> dict[str, bool]:
    """For an object answer: which of the expected fields the prediction got right."""
    p, e = _value(predicted), _value(expected)
    if not isinstance(e, dict):
        return {}
    return {k: isinstance(p, dict) and p.get(k) == v for k, v in e.items()}


@dataclass(frozen=True)
class EvalResult:
    score: float          # mean per-field score: the gate's number
    exact: float          # fraction exactly right
    n: int
    predictions: list[str]
    fields: dict[str, float] | None = None  # objects: each field's accuracy (which fields are still wrong)

    def as_dict(self) -> dict:
        return {"score": self.score, "exact": self.exact, "n": self.n, "fields": self.fields}


def evaluate(engine: Engine, examples: Sequence[Example], adapters: Sequence[tuple[int, float]] = (),
             demonstrations: Sequence[Demonstration] = ()) -> EvalResult:
    """All examples are submitted at once: they share decode batches (and the task's
    common prompt prefix, demonstrations included, in the KV cache)."""
    if not examples:
        raise ValueError("nothing to evaluate")
    reqs = []
    for ex in examples:
        kw: dict[str, Any] = {"messages": with_demonstrations(ex.messages, demonstrations, ex.tools),
                              "temperature": 0.0, "adapters": list(adapters), "max_tokens": answer_budget(engine, ex)}
        if ex.response_format:
            kw["response_format"] = ex.response_format
        if ex.tools:
            kw["tools"], kw["tool_choice"] = ex.tools, "required"
        reqs.append(engine.submit(**kw))
    texts = []
    for r in reqs:
        try:
            texts.append(r.result().text)
        except MtllmError as e:  # e.g. a held-out prompt longer than this engine's context
            texts.append(f"<error: {e}>")
    return scored(texts, examples)


def answer_budget(engine: Engine, ex: Example) -> int:
    """The tokens an answer to `ex` may take: its label's length and some slack."""
    return min(1024, len(engine.tokenize(ex.completion, add_special=False)) + 32)


def evaluate_remote(complete: Callable[[dict], str], examples: Sequence[Example], max_tokens: Sequence[int],
                    demonstrations: Sequence[Demonstration] = (), workers: int = 8) -> EvalResult:
    """`evaluate` for a model served elsewhere (the target gate): `complete(kwargs)` makes one
    OpenAI-style chat call and returns its text; the same messages, schema, greedy decoding
    and budget as `evaluate`. Each call is tried twice; if one still fails, this raises: a
    verdict needs every answer, and a server that fails calls says nothing about the adapter."""
    if not examples:
        raise ValueError("nothing to evaluate")
    errors: list[str] = []

    def one(i: int) -> str:
        ex = examples[i]
        kw: dict[str, Any] = {"messages": with_demonstrations(ex.messages, demonstrations, ex.tools),
                              "temperature": 0.0, "max_tokens": max_tokens[i]}
        if ex.response_format:
            kw["response_format"] = ex.response_format
        for attempt in (1, 2):
            try:
                return complete(kw)
            except Exception as e:
                if attempt == 2:
                    errors.append(f"{type(e).__name__}: {e}")
        return "<error>"

    with ThreadPoolExecutor(max(1, min(workers, len(examples))), thread_name_prefix="mtllm-target-gate") as pool:
        texts = list(pool.map(one, range(len(examples))))
    if errors:
        raise MtllmError(f"{len(errors)} of {len(examples)} calls failed on the server; first: {errors[0][:300]}")
    return scored(texts, examples)


def scored(texts: Sequence[str], examples: Sequence[Example]) -> EvalResult:
    preds, exact, fields = [], 0, 0.0
    per_field: dict[str, list[bool]] = {}
    for text, ex in zip(texts, examples):
        ok, f = field_score(text, ex.completion)
        preds.append(text)
        exact += ok
        fields += f
        for k, hit in field_hits(text, ex.completion).items():
            per_field.setdefault(k, []).append(hit)
    by_field = {k: sum(v) / len(v) for k, v in per_field.items()} if len(per_field) > 1 else None
    return EvalResult(score=fields / len(examples), exact=exact / len(examples), n=len(examples), predictions=preds,
                      fields=by_field)


def agreement(a: EvalResult, b: EvalResult) -> float:
    """The fraction of examples on which two models gave the same value."""
    return sum(field_score(x, y)[0] for x, y in zip(a.predictions, b.predictions)) / max(1, a.n)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    candidate: EvalResult
    baseline: EvalResult
    margin: float
    reason: str

    def metrics(self) -> dict:
        return {"candidate_score": self.candidate.score, "candidate_exact": self.candidate.exact,
                "baseline_score": self.baseline.score, "baseline_exact": self.baseline.exact,
                "n_heldout": self.candidate.n, "margin": self.margin, "passed": self.passed, "reason": self.reason}


def judge(candidate: EvalResult, baseline: EvalResult, *, margin: float, min_heldout: int) -> Verdict:
    if candidate.n < min_heldout:
        return Verdict(False, candidate, baseline, margin, f"only {candidate.n} held-out examples (< {min_heldout})")
    if candidate.score >= baseline.score + margin:
        return Verdict(True, candidate, baseline, margin,
                       f"{candidate.score:.3f} beats {baseline.score:.3f} by >= {margin}")
    return Verdict(False, candidate, baseline, margin,
                   f"{candidate.score:.3f} does not beat {baseline.score:.3f} by {margin}")
