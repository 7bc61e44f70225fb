"""Task identity: what both loops key a `by llm()` function by.

A task is a Jac function as the model sees it: its name plus a hash of its system
text (byllm puts the signature and description there), return schema and tools. A
changed signature is a new task, with its own examples and adapters.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

SLUG_MAX = 40  # readable part of a task directory's name; the hash keeps it unique


def task_key(function: str | None, messages: list, response_format: Any, tools: Any) -> str:
    """`<function>:<12 hex of sha256(system text, schema, tools)>`."""
    system = next((m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "system"), "")
    blob = json.dumps([system, response_format, tools], sort_keys=True, default=repr)
    return f"{function or 'anonymous'}:{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def task_dirname(task_key: str) -> str:
    """The directory name of a task's versions: `<slug of the function name>-<16 hex of
    sha256(task key)>`. Lowercase [a-z0-9_-] only: no separator, never `.` or `..`, at
    most 57 characters, and distinct keys (even ones differing only in case or in
    characters the slug drops) get distinct names on case-insensitive file systems too."""
    function = task_key.rsplit(":", 1)[0]
    slug = re.sub(r"[^a-z0-9_]+", "-", function.lower()).strip("-_")[:SLUG_MAX].strip("-_") or "task"
    digest = hashlib.sha256(task_key.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{slug}-{digest}"
