"""Hot deploy: which adapter serves a task's calls in this process's engines, kept in
step with the registry's deployed pointers without a restart.

`refresh(store)` re-reads the pointers when the store changed (SQLite's data_version:
a promotion or rollback committed by the training process, the CLI or another
program); `route(engine, task_key)` answers from that. A newly deployed adapter is
loaded into the engine on first use; one no longer deployed is unloaded in the
background (the engine waits for requests still using it). Other tasks are untouched.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass

from .. import demonstrations, models
from ..demonstrations import Demonstration
from ..engine import Engine
from ..state.registry import AdapterVersion, Registry
from ..state.remote import loaded_names
from ..state.store import Store
from .remote_calls import Remote

log = logging.getLogger("mtllm_locally.deploy")


@dataclass(frozen=True)
class Route:
    adapter_id: str | None          # None: the base model serves the task
    adapters: tuple = ()            # for Engine.submit(adapters=...)
    score: float | None = None      # the deployed version's held-out score (None: no adapter)
    demonstrations: tuple[Demonstration, ...] = ()  # shown before the call (see demonstrations.py)
    remote: Remote | None = None    # a vLLM server serves the call (remote_calls.py); `adapters` are the fallback


BASE = Route(None)


class Router:
    def __init__(self):
        self._lock = threading.Lock()
        self._stamp = None
        self._serving: dict[tuple[str, str], AdapterVersion] = {}
        self.remote_names: dict[tuple[str, str], str] = {}  # (server, adapter_id) -> its name there
        self.training_threads = 0   # cores the trainings running on the store hold
        # engine -> adapter_id -> native adapter id; an engine that is gone drops out
        self._loaded: weakref.WeakKeyDictionary[Engine, dict[str, int]] = weakref.WeakKeyDictionary()
        self._bases: dict[str, str] = {}  # model path -> fingerprint
        self._demonstrations: dict[str, tuple[Demonstration, ...]] = {}  # adapter_id -> its (immutable) file

    def base_of(self, engine: Engine) -> str:
        path = engine.info.path
        if path not in self._bases:
            self._bases[path] = models.fingerprint(path)
        return self._bases[path]

    def refresh(self, store: Store) -> bool:
        """Re-read deployments and running trainings if anyone committed; True if it did."""
        stamp = (id(store), *store.data_version())
        with self._lock:
            if stamp == self._stamp:
                return False
            registry = Registry(store)
            self._serving = registry.serving()
            self.remote_names = loaded_names(registry)
            self.training_threads = sum(v.training_threads for v in registry.trainings())
            self._stamp = stamp
            return True

    def deployed(self, engine: Engine, task_key: str) -> AdapterVersion | None:
        with self._lock:
            return self._serving.get((task_key, self.base_of(engine)))

    def route(self, engine: Engine, task_key: str) -> Route:
        with self._lock:
            loaded = self._loaded.setdefault(engine, {})
            hit = self._serving.get((task_key, self.base_of(engine)))
            if hit is None:
                self._unload_stale(engine, loaded)
                return BASE
            shown = self._demonstrations_of(hit)
            if shown is None:
                return BASE
            if not hit.serves_adapter:
                self._unload_stale(engine, loaded)
                return Route(hit.adapter_id, (), hit.score, shown)
            if hit.adapter_id not in loaded:
                try:
                    loaded[hit.adapter_id] = engine.load_adapter(hit.gguf_path)
                except Exception as e:  # a deploy must never fail the call: keep serving the base
                    log.warning("cannot deploy %s (serving the base model): %s", hit.adapter_id, e)
                    return BASE
                log.info("deployed %s into the running engine", hit.adapter_id)
                self._unload_stale(engine, loaded)
            return Route(hit.adapter_id, ((loaded[hit.adapter_id], 1.0),), hit.score, shown)

    def _demonstrations_of(self, v: AdapterVersion) -> tuple[Demonstration, ...] | None:
        """The version's demonstrations, read once (a version never changes); None when
        its file cannot be read (the task is then served by the base model)."""
        if not v.serves_demonstrations:
            return ()
        if v.adapter_id not in self._demonstrations:
            try:
                self._demonstrations[v.adapter_id] = demonstrations.load(v.demonstrations_path)
            except (OSError, ValueError) as e:  # a deploy must never fail the call
                log.warning("cannot deploy %s (serving the base model): %s", v.adapter_id, e)
                return None
        return self._demonstrations[v.adapter_id]

    def _unload_stale(self, engine: Engine, loaded: dict[str, int]) -> None:
        live = {v.adapter_id for v in self._serving.values()}
        for adapter_id in [a for a in loaded if a not in live]:
            native = loaded.pop(adapter_id)
            threading.Thread(target=_unload, args=(engine, native, adapter_id), daemon=True).start()

    def loaded(self, engine: Engine) -> dict[str, int]:
        with self._lock:
            return dict(self._loaded.get(engine, {}))


def _unload(engine: Engine, native: int, adapter_id: str) -> None:
    try:
        engine.unload_adapter(native)
        log.info("unloaded %s (no longer deployed)", adapter_id)
    except Exception as e:
        log.debug("unloading %s: %s", adapter_id, e)
