"""Hot deploy: which adapter serves a task's calls in this process, kept in step
with the registry's deployed pointers without a restart.

Each call asks `route(engine, task_key)`. The answer is cached and refreshed when
the store changes (SQLite's data_version: a promotion or rollback committed by the
training process, the CLI or another program). A newly deployed adapter is loaded
into the engine on first use; one no longer deployed is unloaded in the background
(the engine waits for requests still using it). Other tasks are untouched.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .. import models
from ..engine import Engine
from ..learn.store import Store

log = logging.getLogger("mtllm_locally.deploy")


@dataclass(frozen=True)
class Route:
    adapter_id: str | None          # None: the base model serves the task
    adapters: tuple = ()            # for Engine.submit(adapters=...)
    score: float | None = None      # the deployed version's held-out score (None: no adapter)


BASE = Route(None)


class Router:
    def __init__(self):
        self._lock = threading.Lock()
        self._stamp = None
        self._deployed: dict[tuple[str, str], tuple[str, str, float | None]] = {}
        self._loaded: dict[int, dict[str, int]] = {}      # id(engine) -> adapter_id -> native adapter id
        self._bases: dict[str, str] = {}                  # model path -> fingerprint
        self._training_threads = 0                        # cores a running training holds

    def base_of(self, engine: Engine) -> str:
        path = engine.info.path
        if path not in self._bases:
            self._bases[path] = models.fingerprint(path)
        return self._bases[path]

    def _refresh(self, store: Store) -> None:
        stamp = (id(store), *store.data_version())
        if stamp == self._stamp:
            return
        rows = store.rows("SELECT d.task_key, d.base, d.adapter_id, a.path, a.metrics_json FROM deployments d "
                          "LEFT JOIN adapters a ON a.adapter_id=d.adapter_id WHERE d.adapter_id IS NOT NULL")
        self._deployed = {(r["task_key"], r["base"]): (r["adapter_id"], str(Path(r["path"]) / "adapter.gguf"),
                                                       json.loads(r["metrics_json"] or "{}").get("candidate_score"))
                          for r in rows}
        running = store.rows("SELECT config_json FROM adapters WHERE status='training'")
        self._training_threads = sum(max(1, json.loads(r["config_json"] or "{}").get("policy", {}).get("threads") or
                                         (os.cpu_count() or 1)) for r in running)
        self._stamp = stamp

    def share_cores(self, engine: Engine) -> None:
        """While a training runs on this store, decode with the cores it leaves free."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        engine.set_threads(max(1, cores - self._training_threads) if self._training_threads else 0)

    def route(self, engine: Engine, task_key: str, store: Store | None) -> Route:
        if store is None:
            return BASE
        with self._lock:
            self._refresh(store)
            self.share_cores(engine)
            hit = self._deployed.get((task_key, self.base_of(engine)))
            loaded = self._loaded.setdefault(id(engine), {})
            if hit is None:
                self._unload_stale(engine, loaded)
                return BASE
            adapter_id, path, score = hit
            if adapter_id not in loaded:
                try:
                    loaded[adapter_id] = engine.load_adapter(path)
                except Exception as e:  # a deploy must never fail the call: keep serving the base
                    log.warning("cannot deploy %s (serving the base model): %s", adapter_id, e)
                    return BASE
                log.info("deployed %s into the running engine", adapter_id)
                self._unload_stale(engine, loaded)
            return Route(adapter_id, ((loaded[adapter_id], 1.0),), score)

    def _unload_stale(self, engine: Engine, loaded: dict[str, int]) -> None:
        live = {a for a, _, _ in self._deployed.values()}
        for adapter_id in [a for a in loaded if a not in live]:
            native = loaded.pop(adapter_id)
            threading.Thread(target=_unload, args=(engine, native, adapter_id), daemon=True).start()

    def loaded(self, engine: Engine) -> dict[str, int]:
        with self._lock:
            return dict(self._loaded.get(id(engine), {}))


def _unload(engine: Engine, native: int, adapter_id: str) -> None:
    try:
        engine.unload_adapter(native)
        log.info("unloaded %s (no longer deployed)", adapter_id)
    except Exception as e:
        log.debug("unloading %s: %s", adapter_id, e)


router = Router()
