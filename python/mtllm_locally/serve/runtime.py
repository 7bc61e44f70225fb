"""The serving loop's one object per process: it owns the call store, the engines,
the deploy router, the provider's settings, the learning policy, the call
pipeline (`calls`) and the students running in shadow (`shadows`), and it
publishes each captured call to whoever subscribed (`on_call`: the learning loop,
wired in wiring.py).

Capture never breaks or slows a call: the store is opened lazily, every store or
subscriber error is logged and swallowed, and a write is one small SQLite
transaction (~0.1 ms in WAL).
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import models
from ..engine import Engine, EngineConfig, Request
from ..state.policy import Policy
from ..state.store import Store
from .engines import EnginePool
from .remote_calls import ServerHealth, remote_for
from .router import BASE, Route, Router
from .shadows import Shadows

log = logging.getLogger("mtllm_locally.runtime")


@dataclass
class Settings:
    """How the provider decodes byllm's calls."""
    # Typed calls (a schema or tools) are greedy: byllm sends temperature=0.7 even where a
    # program asked for 0.0, and a 135M model's typed answers get worse with sampling.
    typed_temperature: float | None = 0.0            # None: honour the request's temperature
    task_temperature: dict[str, float] = field(default_factory=dict)  # per Jac function
    max_tool_turns: int = 8                          # ReAct: after this many tool calls, finish_tool
    # Typed calls: a budget from the schema, the loop guard, retries that differ (typed_calls.py).
    # MTLLM_LOCALLY_TYPED_GUARD=0 turns it off (the bench's "before").
    typed_guard: bool = field(default_factory=lambda: os.environ.get("MTLLM_LOCALLY_TYPED_GUARD", "1") != "0")
    # Teacher mode: students left running in shadow after their calls returned. Beyond it a
    # taught call runs none, so a fast teacher cannot pile student requests up in the engine
    # in front of the calls it serves. 0: no shadows.
    max_shadows: int = 4


@dataclass(frozen=True)
class CapturedCall:
    """What `on_call` subscribers receive after a model turn was stored."""
    invocation_id: str
    task_key: str
    function: str | None
    model_path: str | None
    source: str                 # "model" or "teacher:<model>"
    adapter: str | None


class Runtime:
    def __init__(self, *, store_path: str | os.PathLike | None = None, capture: bool | None = None,
                 engine_config: EngineConfig | None = None, settings: Settings | None = None,
                 policy: Policy | None = None):
        self.store_path = store_path
        self.capture_enabled = os.environ.get("MTLLM_LOCALLY_CAPTURE", "1") != "0" if capture is None else capture
        self.settings = settings or Settings()
        self.policy = policy or Policy()
        self.engines = EnginePool(engine_config)
        self.router = Router()
        self.servers = ServerHealth()  # vLLM servers that failed a call lately (remote_calls.py)
        self._server_bases: dict[str, str | None] = {}  # vllm.model -> its fingerprint
        # Per context: the last call captured (what feedback() refers to by default), and
        # whether capture is suppressed (a teacher answering through this very provider).
        self.last_invocation: contextvars.ContextVar[str | None] = contextvars.ContextVar(
            f"mtllm_last_invocation_{id(self)}", default=None)
        self.suppressed: contextvars.ContextVar[bool] = contextvars.ContextVar(
            f"mtllm_capture_suppressed_{id(self)}", default=False)
        self._lock = threading.Lock()
        self._store: Store | None = None
        self._on_call: list[Callable[[CapturedCall], None]] = []
        self._on_feedback: list[Callable[[str], None]] = []
        self._on_close: list[Callable[[], None]] = []
        self.closed = False
        self.shadows = Shadows(self._record_shadow)
        from .pipeline import CallPipeline  # the pipeline needs a runtime; the runtime offers it

        self.calls = CallPipeline(self)

    # ------------------------------------------------------------------ subscriptions
    def on_call(self, hook: Callable[[CapturedCall], None]) -> None:
        """`hook(captured)` after each captured model turn, on the serving path: keep it short."""
        self._on_call.append(hook)

    def on_feedback(self, hook: Callable[[str], None]) -> None:
        self._on_feedback.append(hook)

    def on_close(self, hook: Callable[[], None]) -> None:
        self._on_close.append(hook)

    # ------------------------------------------------------------------ store
    def store(self) -> Store | None:
        """The call store (opened on first use), or None with capture off."""
        if not self.capture_enabled:
            return None
        with self._lock:
            if self.closed:
                return None
            if self._store is None:
                self._store = Store(self.store_path)
            return self._store

    def store_or_none(self) -> Store | None:
        """For reads on the call path: a broken store means no routing, not a failed call."""
        try:
            return self.store()
        except Exception as e:
            log.warning("call store unavailable (serving the base model): %s: %s", type(e).__name__, e)
            return None

    # ------------------------------------------------------------------ serving
    def route(self, engine: Engine, task_key: str) -> Route:
        """The adapter deployed for this task on this engine's model, loaded; BASE if none.
        While a training runs on the store, engines decode with the cores it leaves free."""
        store = self.store_or_none()
        if store is None:
            return BASE
        try:
            if self.router.refresh(store):
                self.engines.share_cores(_free_cores(self.router.training_threads))
            return self.router.route(engine, task_key)
        except Exception as e:  # the deployed pointer cannot be read: the base model still answers
            log.warning("routing %s failed (serving the base model): %s: %s", task_key, type(e).__name__, e)
            return BASE

    def remote_route(self, engine: Engine, task_key: str, function: str, route: Route) -> Route:
        """`route` with the vLLM server that serves the task's deployed version, if the task's
        policy names one and the version is loaded there; else `route` unchanged (in process)."""
        try:
            settings = self.policy.for_task(function).remote
            if not settings.active:
                return route
            server_base = self._server_base(settings.model)
            if server_base is None or self.router.base_of(engine) != server_base:
                return route  # the server's base is another model's: this model's calls stay here
            v = self.router.deployed(engine, task_key)
            if (v.adapter_id if v else None) != route.adapter_id:
                return route  # the version cannot be served here as deployed (see Router.route)
            remote = remote_for(settings, route.adapter_id, bool(v and v.serves_adapter), self.router.remote_names,
                                self.servers)
        except Exception as e:  # never the call's failure: it is served in process
            log.warning("vLLM routing for %s failed (serving in process): %s: %s", task_key, type(e).__name__, e)
            return route
        return dataclasses.replace(route, remote=remote) if remote else route

    def _server_base(self, model: str) -> str | None:
        """The fingerprint of the local model a server's base was exported from (cached: the
        default model's is read once, not per call); None when `vllm.model` names no model
        here (said once; its calls are served in process)."""
        if model not in self._server_bases:
            try:
                self._server_bases[model] = models.fingerprint(models.resolve(model))
            except Exception as e:
                log.warning("vllm.model %r is not a model here (%s); its tasks are served in process", model, e)
                self._server_bases[model] = None
        return self._server_bases[model]

    def attempt_of(self, invocation_id: str | None) -> int:
        """1 for a call's first answer; n when byllm already had n - 1 final answers to it."""
        if not invocation_id or self.suppressed.get():
            return 1
        st = self.store_or_none()
        try:
            return 1 + (st.answers(invocation_id) if st is not None else 0)
        except Exception as e:
            log.warning("reading earlier attempts failed: %s: %s", type(e).__name__, e)
            return 1

    def record_turn(self, *, invocation_id: str | None, task_key: str, function: str | None, model: str,
                    model_path: str | None, shadow: Request | None = None, **turn: Any) -> str | None:
        """Store one model turn and tell the subscribers; returns the call's invocation id.
        `shadow`: the student still running on a turn a teacher answered; its answer is
        stored into the turn when it finishes (cancelled if the turn is not stored)."""
        if self.suppressed.get():
            _cancel(shadow)
            return None
        inv = invocation_id or f"anon-{uuid.uuid4()}"
        try:
            st = self.store()
            if st is None:
                _cancel(shadow)
                return None
            turn_index = st.record_turn(invocation_id=inv, task_key=task_key, function=function, model=model, **turn)
        except Exception as e:  # capture must never break the program
            log.warning("call capture failed (the call itself succeeded): %s: %s", type(e).__name__, e)
            _cancel(shadow)
            return None
        if shadow is not None:
            self.shadows.follow(shadow, inv, turn_index)
        self.last_invocation.set(inv)
        captured = CapturedCall(inv, task_key, function, model_path, turn.get("source", "model"), turn.get("adapter"))
        for hook in list(self._on_call):
            _safely(hook, captured)
        return inv

    def wants_shadow(self) -> bool:
        """Whether a taught call now should run its student in shadow: its answer would be
        stored, and fewer than `settings.max_shadows` are still running."""
        return (self.capture_enabled and not self.closed and not self.suppressed.get()
                and self.shadows.pending < self.settings.max_shadows)

    def _record_shadow(self, invocation_id: str, turn_index: int, text: str) -> None:
        """The shadows' thread: a student's answer into its turn (dropped once closed)."""
        st = self.store()
        if st is not None:
            st.set_shadow_output(invocation_id, turn_index, text)

    def finish_call(self, invocation_id: str | None, *, accepted: bool, inputs: Any = None,
                    function: str | None = None, error: str | None = None) -> None:
        """byllm's verdict on a call (the Jac plugin reports it)."""
        if not invocation_id:
            return
        try:
            st = self.store()
            if st is not None:
                st.finish_call(invocation_id, accepted=accepted, inputs=inputs, function=function, error=error)
        except Exception as e:
            log.warning("recording byllm's verdict failed: %s: %s", type(e).__name__, e)

    def feedback(self, invocation_id: str | None = None, *, correct: bool | None = None, score: float | None = None,
                 corrected_output: Any = None, note: str | None = None) -> str:
        """Feedback on a call (default: the last one made in this context). Returns its id."""
        inv = invocation_id or self.last_invocation.get()
        if inv is None:
            raise LookupError("no call has been captured in this context yet; pass invocation_id=")
        st = self.store()
        if st is None:
            raise RuntimeError("call capture is switched off")
        st.add_feedback(inv, correct=correct, score=score, corrected_output=plain_value(corrected_output), note=note)
        for hook in list(self._on_feedback):  # a correction is a new labelled example
            _safely(hook, inv)
        return inv

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Subscribers first (the learning trigger stops), then the shadows (cancelled, their
        answers dropped), engines, loop and store. Trainings already started go on in their
        own processes."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            store, self._store = self._store, None
        for hook in self._on_close:
            _safely(hook)
        self.shadows.close()
        self.engines.close()
        if store is not None:
            store.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _free_cores(training_threads: int) -> int:
    """Decode threads while trainings hold `training_threads` cores (0: no training, as configured)."""
    if not training_threads:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - training_threads)


def _cancel(request: Request | None) -> None:
    if request is not None:
        request.cancel()


def _safely(hook: Callable, *args) -> None:
    try:
        hook(*args)
    except Exception as e:  # a subscriber must never break the program
        log.warning("%s failed: %s: %s", getattr(hook, "__qualname__", hook), type(e).__name__, e)


def plain_value(v: Any) -> Any:
    """A corrected output as JSON-able data: enums by value (byllm's schema encodes
    them so), dataclasses and pydantic models as dicts."""
    if isinstance(v, enum.Enum):
        return v.value
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {k: plain_value(x) for k, x in dataclasses.asdict(v).items()}
    if hasattr(v, "model_dump"):
        return v.model_dump()
    if isinstance(v, (list, tuple)):
        return [plain_value(x) for x in v]
    if isinstance(v, dict):
        return {k: plain_value(x) for k, x in v.items()}
    if hasattr(v, "__dict__") and not isinstance(v, (str, int, float, bool)):
        return {k: plain_value(x) for k, x in vars(v).items() if not k.startswith("_")}
    return v
