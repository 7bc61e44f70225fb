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
one user message of text (a string, or text parts as byllm sends them), no tools. A
ReAct conversation (tool calls and results) or an image is served as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

FILE = "demonstrations.json"


Content = Union[str, tuple]  # a user message's content: text, or text parts ({"type": "text", "text": ...})


@dataclass(frozen=True)
class Demonstration:
    user: Content      # the user message of an earlier call of the task, as it was sent
    answer: str        # what the model should have answered (the typed JSON, or text)


def _text_parts(content: Any) -> bool:
    return isinstance(content, (list, tuple)) and bool(content) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content)


def plain_user_content(messages: Sequence[Any], tools: Any = None) -> Content | None:
    """The user message's content when the call has the plain shape, else None."""
    if tools or not messages:
        return None
    msgs = list(messages)
    if isinstance(msgs[0], dict) and msgs[0].get("role") == "system":
        msgs = msgs[1:]
    if len(msgs) != 1 or not isinstance(msgs[0], dict) or msgs[0].get("role") != "user":
        return None
    content = msgs[0].get("content")
    if isinstance(content, str):
        return content
    return tuple(dict(p) for p in content) if _text_parts(content) else None


def content_text(content: Content) -> str:
    return content if isinstance(content, str) else "\n".join(p["text"] for p in content)


def with_demonstrations(messages: list, demonstrations: Sequence[Demonstration], tools: Any = None) -> list:
    """The call's messages with the demonstrations as earlier turns (unchanged when the
    call is not of the plain shape, or there are none)."""
    if not demonstrations or plain_user_content(messages, tools) is None:
        return messages
    head = [messages[0]] if messages[0].get("role") == "system" else []
    turns = []
    for d in demonstrations:
        user = d.user if isinstance(d.user, str) else [dict(p) for p in d.user]
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": d.answer}]
    return head + turns + [messages[-1]]


def save(path: str | Path, demonstrations: Sequence[Demonstration]) -> None:
    Path(path).write_text(json.dumps([{"user": d.user if isinstance(d.user, str) else list(d.user),
                                       "answer": d.answer} for d in demonstrations], indent=1))


def load(path: str | Path) -> tuple[Demonstration, ...]:
    """A version's demonstrations file. A file that is not a list of {user: text or text
    parts, answer: text} raises ValueError (the version is not served with it)."""
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, list) or not all(
            isinstance(d, dict) and (isinstance(d.get("user"), str) or _text_parts(d.get("user")))
            and isinstance(d.get("answer"), str) for d in raw):
        raise ValueError(f"{path}: not a list of demonstrations")
    return tuple(Demonstration(d["user"] if isinstance(d["user"], str) else tuple(d["user"]), d["answer"])
                 for d in raw)
