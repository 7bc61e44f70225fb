"""Where the two loops meet, and the only module that imports both.

The process's runtime (serve/) is built on first use with the learning trigger
(learn/) subscribed to its on-call and feedback hooks, and `mtllm_locally/<model>`
is registered as a LiteLLM provider backed by it. The Jac plugin, a Python program
(`mtllm_locally.register_provider()`), `feedback` and `configure_learning` all reach
the same runtime through `runtime()`. Tests build their own with `use_runtime`.
"""

from __future__ import annotations

import threading
from typing import Any

from .learn.trigger import Learner, TaskRef
from .serve.runtime import CapturedCall, Runtime

_lock = threading.Lock()
_runtime: Runtime | None = None  # the process's runtime: the one piece of module state


class LearningHook:
    """The learning trigger, started on the first captured call of a task it can train
    (a named Jac function served by a local model), stopped with the runtime."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._lock = threading.Lock()
        self.learner: Learner | None = None

    def on_call(self, captured: CapturedCall) -> None:
        if not (captured.function and captured.model_path):
            return
        store = self.runtime.store()
        if store is None:
            return
        with self._lock:
            if self.learner is None:
                self.learner = Learner(store, self.runtime.policy)
            learner = self.learner
        learner.nudge(TaskRef(captured.task_key, captured.function, captured.model_path))

    def on_feedback(self, invocation_id: str) -> None:
        if self.learner is not None:
            self.learner.wake()

    def stop(self) -> None:
        if self.learner is not None:
            self.learner.stop()


def attach_learning(runtime: Runtime) -> LearningHook:
    hook = LearningHook(runtime)
    runtime.on_call(hook.on_call)
    runtime.on_feedback(hook.on_feedback)
    runtime.on_close(hook.stop)
    return hook


def runtime() -> Runtime:
    """The process's runtime, built (with learning attached) on first use."""
    global _runtime
    with _lock:
        if _runtime is None or _runtime.closed:
            _runtime = Runtime()
            attach_learning(_runtime)
        return _runtime


def use_runtime(rt: Runtime | None, *, learning: bool = True) -> Runtime | None:
    """Make `rt` the process's runtime (None: build a fresh one on next use); the one it
    replaces is closed. With `learning`, the trigger is attached to `rt`."""
    global _runtime
    with _lock:
        old, _runtime = _runtime, rt
    if old is not None and old is not rt:
        old.close()
    if rt is not None and learning:
        attach_learning(rt)
    return rt


def register_provider() -> None:
    """Make `mtllm_locally/<model>` a LiteLLM provider served by the process's runtime (idempotent)."""
    from .serve.litellm_provider import MtllmLocallyLLM, register

    register(MtllmLocallyLLM(runtime))


def feedback(invocation_id: str | None = None, **kw: Any) -> str:
    """Feedback on a call (default: the last one captured in this context): `correct=`,
    `score=`, `corrected_output=`, `note=`. Returns its invocation id."""
    return runtime().feedback(invocation_id, **kw)


def configure_learning(function: str | None = None, **settings: Any) -> None:
    """Change the learning policy globally, or for one Jac function."""
    runtime().policy.configure(function, **settings)
