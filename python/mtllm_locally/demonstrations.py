"""Demonstrations: a task's own labelled calls, shown to the model before the call.

A task that has a few labelled calls can be served better at once, before any
training: its prompt gets a fixed block of earlier (input, answer) pairs as chat
turns between the system message and the call's own message. The block is the same
for every call of the task, so it is a stable prompt prefix and the engine's prefix
KV cache computes it once. Which pairs, and whether they help at all, is decided by
the learning loop (learn/demonstrations.py picks them, the gate measures them); the
serving path and the gate apply them with `with_demonstrations`, so the gate scores
exactly the prompt that will be served.

Only calls of the plain shape take demonstrations: an optional system message and
one user message, no tools. A ReAct conversation (tool calls and results) is served
as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

FILE = "demonstrations.json"


@dataclass(frozen=True)
class Demonstration:
    user: str          # the user message of an earlier call of the task
    answer: str        # what the model should have answered (the typed JSON, or text)


def plain_user_text(messages: Sequence[Any], tools: Any = None) -> str | None:
    """The user message's text when the call has the plain shape, else None."""
    if tools or not messages:
        return None
    msgs = list(messages)
    if isinstance(msgs[0], dict) and msgs[0].get("role") == "system":
        msgs = msgs[1:]
    if len(msgs) != 1 or not isinstance(msgs[0], dict) or msgs[0].get("role") != "user":
        return None
    content = msgs[0].get("content")
    return content if isinstance(content, str) else None


def with_demonstrations(messages: list, demonstrations: Sequence[Demonstration], tools: Any = None) -> list:
    """The call's messages with the demonstrations as earlier turns (unchanged when the
    call is not of the plain shape, or there are none)."""
    if not demonstrations or plain_user_text(messages, tools) is None:
        return messages
    head = [messages[0]] if messages[0].get("role") == "system" else []
    turns = []
    for d in demonstrations:
        turns += [{"role": "user", "content": d.user}, {"role": "assistant", "content": d.answer}]
    return head + turns + [messages[-1]]


def save(path: str | Path, demonstrations: Sequence[Demonstration]) -> None:
    Path(path).write_text(json.dumps([{"user": d.user, "answer": d.answer} for d in demonstrations], indent=1))


def load(path: str | Path) -> tuple[Demonstration, ...]:
    """A version's demonstrations file. A file that is not a list of {user, answer}
    strings raises ValueError (the version is not served with it)."""
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, list) or not all(isinstance(d, dict) and isinstance(d.get("user"), str)
                                            and isinstance(d.get("answer"), str) for d in raw):
        raise ValueError(f"{path}: not a list of demonstrations")
    return tuple(Demonstration(d["user"], d["answer"]) for d in raw)
