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


def configure(path: str | os.PathLike | None = None, enabled: bool = True) -> None:
    """Where calls are captured (default ./.mtllm_locally/calls.sqlite3), or switch capture off."""
    global _store, _store_path, _disabled
    with _lock:
        if _store is not None:
            _store.close()
        _store, _store_path, _disabled = None, None if path is None else str(path), not enabled


def store() -> Store | None:
    global _store
    if _disabled:
        return None
    with _lock:
        if _store is None:
            _store = Store(_store_path)
        return _store


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


def record_turn(*, metadata: dict | None, model: str, messages: list, response_format: Any, tools: Any,
                output_text: str | None, tool_calls: Any, finish_reason: str, latency_ms: float,
                prompt_tokens: int, completion_tokens: int, cached_tokens: int, temperature: float) -> None:
    def write():
        st = store()
        if st is None:
            return
        meta = metadata or {}
        inv = meta.get("jac_invocation_id") or f"anon-{uuid.uuid4()}"
        fn = meta.get("jac_caller_name")
        st.record_turn(invocation_id=inv, task_key=task_key(fn, messages, response_format, tools), function=fn,
                       model=model, messages=messages, response_format=response_format, tools=tools,
                       output_text=output_text, tool_calls=tool_calls, finish_reason=finish_reason,
                       latency_ms=latency_ms, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       cached_tokens=cached_tokens, temperature=temperature)
        last_invocation.set(inv)

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
    st.add_feedback(inv, correct=correct, score=score, corrected_output=corrected_output, note=note)
    return inv
