"""Capture of served calls into the store (serve writes, learn reads).

Never breaks or slows the program: the store is opened lazily, every error is
logged and swallowed, and a write is one small SQLite transaction (~0.1 ms in WAL).
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import threading
import uuid
from typing import Any

from ..learn.store import Store

log = logging.getLogger("mtllm_locally.recorder")

_lock = threading.Lock()
_store: Store | None = None
_store_path: str | None = None
_disabled = os.environ.get("MTLLM_LOCALLY_CAPTURE", "1") == "0"
last_invocation: contextvars.ContextVar[str | None] = contextvars.ContextVar("mtllm_last_invocation", default=None)
# Set while a teacher answers for the student: a teacher served by our own provider
# must not be captured as a call of its own.
suppressed: contextvars.ContextVar[bool] = contextvars.ContextVar("mtllm_capture_suppressed", default=False)
_learner = None


def configure(path: str | os.PathLike | None = None, enabled: bool = True) -> None:
    """Where calls are captured (default ./.mtllm_locally/calls.sqlite3), or switch capture off."""
    global _store, _store_path, _disabled, _learner
    with _lock:
        if _learner is not None:
            _learner.stop()
        if _store is not None:
            _store.close()
        _store, _store_path, _disabled, _learner = None, None if path is None else str(path), not enabled, None


def learner():
    """The learning loop's trigger for this process's store (started on first use)."""
    global _learner
    st = store()
    if st is None:
        return None
    with _lock:
        if _learner is None or _learner.store is not st:
            from ..learn.loop import Learner

            _learner = Learner(st)
        return _learner


def store() -> Store | None:
    global _store
    if _disabled:
        return None
    with _lock:
        if _store is None:
            _store = Store(_store_path)
        return _store


def store_or_none() -> Store | None:
    """The store for reads on the call path: a broken store means no routing, not a failed call."""
    try:
        return store()
    except Exception as e:
        log.warning("call store unavailable (serving the base model): %s: %s", type(e).__name__, e)
        return None


def task_key(function: str | None, messages: list, response_format: Any, tools: Any) -> str:
    """The Jac function's name plus a hash of what defines it to the model: its
    system text (byllm puts the signature and description there), return schema and
    tools. A changed signature is a new task."""
    system = next((m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "system"), "")
    blob = json.dumps([system, response_format, tools], sort_keys=True, default=repr)
    return f"{function or 'anonymous'}:{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def safely(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as e:  # capture must never break the program
        log.warning("call capture failed (the call itself succeeded): %s: %s", type(e).__name__, e)


def record_turn(*, metadata: dict | None, task: str, model: str, messages: list, response_format: Any,
                tools: Any, output_text: str | None, tool_calls: Any, finish_reason: str, latency_ms: float,
                prompt_tokens: int, completion_tokens: int, cached_tokens: int, temperature: float,
                adapter: str | None = None, source: str = "model", shadow_output: str | None = None,
                model_path: str | None = None) -> None:
    if suppressed.get():
        return

    def write():
        st = store()
        if st is None:
            return
        meta = metadata or {}
        inv = meta.get("jac_invocation_id") or f"anon-{uuid.uuid4()}"
        fn = meta.get("jac_caller_name")
        st.record_turn(invocation_id=inv, task_key=task, function=fn, model=model, messages=messages,
                       response_format=response_format, tools=tools, output_text=output_text,
                       tool_calls=tool_calls, finish_reason=finish_reason, latency_ms=latency_ms,
                       prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cached_tokens=cached_tokens,
                       temperature=temperature, adapter=adapter, source=source, shadow_output=shadow_output)
        last_invocation.set(inv)
        if model_path and fn:
            from ..learn.loop import TaskRef

            lrn = learner()
            if lrn is not None:
                lrn.nudge(TaskRef(task, fn, model_path))

    safely(write)


def finish_call(invocation_id: str | None, *, accepted: bool, inputs: Any = None, function: str | None = None,
                error: str | None = None) -> None:
    if not invocation_id:
        return

    def write():
        st = store()
        if st is not None:
            st.finish_call(invocation_id, accepted=accepted, inputs=inputs, function=function, error=error)

    safely(write)


def feedback(invocation_id: str | None = None, *, correct: bool | None = None, score: float | None = None,
             corrected_output: Any = None, note: str | None = None) -> str:
    """Feedback on a call (default: the last one made in this context). Returns its id."""
    inv = invocation_id or last_invocation.get()
    if inv is None:
        raise LookupError("no call has been captured in this context yet; pass invocation_id=")
    st = store()
    if st is None:
        raise RuntimeError("call capture is switched off")
    st.add_feedback(inv, correct=correct, score=score, corrected_output=_plain_value(corrected_output), note=note)
    lrn = _learner
    if lrn is not None:
        lrn.wake()  # a correction is a new labelled example
    return inv


def _plain_value(v: Any) -> Any:
    """A corrected output as JSON-able data: enums by value (byllm's schema encodes
    them so), dataclasses and pydantic models as dicts."""
    import dataclasses
    import enum

    if isinstance(v, enum.Enum):
        return v.value
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {k: _plain_value(x) for k, x in dataclasses.asdict(v).items()}
    if hasattr(v, "model_dump"):
        return v.model_dump()
    if isinstance(v, (list, tuple)):
        return [_plain_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain_value(x) for k, x in v.items()}
    if hasattr(v, "__dict__") and not isinstance(v, (str, int, float, bool)):
        return {k: _plain_value(x) for k, x in vars(v).items() if not k.startswith("_")}
    return v
