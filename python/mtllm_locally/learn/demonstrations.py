"""Picking a task's demonstrations from its labelled calls (see ../demonstrations.py).

A fixed set per task, not one per input: the block then is one prompt prefix that
the engine caches, so demonstrations cost little after the first call. The set
covers the task's answers: examples are grouped by their answer's shape (the label
for an enum, the keys and value types for an object) and taken round-robin over the
groups, the best-vouched and newest first, until `k` are taken or the token budget
is spent. Only training examples are used: a held-out input never becomes a
demonstration, so the gate's held-out score stays honest.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, Callable, Sequence

from ..demonstrations import Demonstration, content_text, plain_user_content
from .dataset import RANK, Example

DEFAULT_K = 8
DEFAULT_MAX_TOKENS = 1536


def _shape(value: Any) -> Any:
    if isinstance(value, dict):
        if list(value) == ["schema_object_wrapper"]:
            return _shape(value["schema_object_wrapper"])
        return tuple(sorted((k, type(v).__name__) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("list", len(value) > 0)
    return value if isinstance(value, (bool, int, str)) and len(str(value)) <= 40 else type(value).__name__


def answer_group(completion: str) -> str:
    """Which group an answer covers: the value itself for short scalars (labels), its
    keys and types for objects."""
    try:
        return repr(_shape(json.loads(completion)))
    except (json.JSONDecodeError, TypeError):
        return "text"


def choose(examples: Sequence[Example], *, k: int = DEFAULT_K, max_tokens: int = DEFAULT_MAX_TOKENS,
           count_tokens: Callable[[str], int] = lambda s: len(s) // 3) -> list[Example]:
    """Up to `k` training examples of the plain shape, covering the answers' groups."""
    usable = [e for e in examples if not e.heldout and plain_user_content(e.messages, e.tools) is not None]
    groups: dict[str, list[Example]] = defaultdict(list)
    for e in sorted(usable, key=lambda e: (RANK[e.label], e.created_at), reverse=True):
        groups[answer_group(e.completion)].append(e)
    # Larger groups first (the common answers), then round-robin: every answer seen is shown.
    queues = sorted(groups.values(), key=len, reverse=True)
    chosen: list[Example] = []
    spent = 0
    while len(chosen) < k and any(queues):
        for q in queues:
            if not q or len(chosen) >= k:
                continue
            e = q.pop(0)
            cost = count_tokens(content_text(plain_user_content(e.messages, e.tools))) + count_tokens(e.completion) + 8
            if spent + cost > max_tokens:
                continue
            chosen.append(e)
            spent += cost
    # Oldest first in the prompt: the order the calls came in, the same for every call of the task.
    return sorted(chosen, key=lambda e: e.created_at)


def as_demonstrations(examples: Sequence[Example]) -> tuple[Demonstration, ...]:
    return tuple(Demonstration(plain_user_content(e.messages, e.tools), e.completion) for e in examples)
