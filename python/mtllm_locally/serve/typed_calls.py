"""How typed calls (a response schema or tools) are decoded, beyond the constraint:

- a token budget from the schema when the caller gave none (byllm sends no max_tokens):
  room for a plausible value of that shape, not an arbitrary number. The engine closes
  the value before the budget runs out either way (budget-aware closing), so the budget
  bounds latency, never validity;
- the loop guard: a value that repeats one item over and over is closed early;
- a retry that can succeed: when byllm asks again for the same call (its previous
  answer failed byllm's own checks), the new attempt samples with another seed instead
  of repeating the greedy answer that failed.
"""

from __future__ import annotations

import json
import math
from typing import Any

MIN_BUDGET = 64        # the smallest typed budget: any real answer plus its JSON punctuation
MAX_BUDGET = 1024      # a generous cap: ~30 s on a 135M model on 2 cores; closing keeps it valid
STRING_TOKENS = 24     # a name, a date, a short phrase; longer text closes at the budget
ARRAY_ITEMS = 6        # items to leave room for when the schema gives no maxItems
RETRY_TEMPERATURE = 0.7
MAX_DEPTH = 32
MAX_NODES = 2000       # schema nodes visited per estimate: a $ref graph that branches is not walked out


def budget(response_format: Any, tools: list | None) -> int:
    """max_tokens for a typed call that did not set one. An estimate only: a schema it
    cannot read gets the cap (the constraint itself rejects a bad schema at submit)."""
    try:
        return _budget(response_format, tools)
    except (TypeError, ValueError, AttributeError, RecursionError):
        return MAX_BUDGET


def _budget(response_format: Any, tools: list | None) -> int:
    if tools:
        sizes = [_size((t.get("function") or {}).get("parameters") or {}, {}, 0, [MAX_NODES]) + 12
                 for t in tools if isinstance(t, dict)]
        est = max(sizes, default=STRING_TOKENS)
    else:
        schema = _schema(response_format)
        defs = schema.get("$defs") or schema.get("definitions") or {} if schema else {}
        est = _size(schema, defs if isinstance(defs, dict) else {}, 0, [MAX_NODES]) if schema else 128
    return max(MIN_BUDGET, min(MAX_BUDGET, math.ceil(est * 1.5) + 16))


def _schema(response_format: Any) -> dict | None:
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        return schema if isinstance(schema, dict) else None
    return None


def _size(s: Any, defs: dict, depth: int, nodes: list[int]) -> float:
    """Rough tokens of a typical value of schema `s`; `nodes` is the visits left (shared)."""
    nodes[0] -= 1
    if not isinstance(s, dict) or depth > MAX_DEPTH or nodes[0] < 0:
        return STRING_TOKENS
    ref = s.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target = defs.get(ref.rsplit("/", 1)[-1])
        return _size(target, defs, depth + 1, nodes) if target is not None else STRING_TOKENS
    for key in ("anyOf", "oneOf"):
        if isinstance(s.get(key), list) and s[key]:
            return max(_size(x, defs, depth + 1, nodes) for x in s[key])
    if isinstance(s.get("enum"), list) and s["enum"]:
        return max(len(json.dumps(v)) for v in s["enum"]) / 2 + 2
    kind = s.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in s:
        props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
        return 2 + sum(4 + len(str(k)) / 3 + _size(v, defs, depth + 1, nodes) for k, v in props.items())
    if kind == "array":
        n = s.get("maxItems") if isinstance(s.get("maxItems"), int) else ARRAY_ITEMS
        n = max(min(n, ARRAY_ITEMS), s.get("minItems") if isinstance(s.get("minItems"), int) else 0)
        return 2 + n * (1 + _size(s.get("items") or {}, defs, depth + 1, nodes))
    if kind == "string":
        if isinstance(s.get("maxLength"), int):
            return min(STRING_TOKENS * 4, s["maxLength"] / 2 + 2)
        return STRING_TOKENS
    if kind in ("integer", "number"):
        return 8
    return 2  # boolean, null


def retry_sampling(sampling: dict, temperature: float, attempt: int) -> tuple[dict, float]:
    """Sampling for attempt `attempt` (2, 3, ...) of one call: another seed, and sampling."""
    seed = sampling.get("seed")
    base = seed if isinstance(seed, int) else 0
    return {**sampling, "seed": (base + 7919 * attempt) % (2**32 - 1)}, max(temperature, RETRY_TEMPERATURE)
