"""Promoted versions on a vLLM server (scale-out): push, switch, drain, reconcile.

    push       load the version's PEFT adapter under a versioned name, check that the
               server lists it, judge it there (the target gate, a callback from learn/)
    switch     the registry's pointer moves (Registry.promote / rollback); then
    retire     every other name of the task is marked retired, and unloaded once drained
    reconcile  unload names nobody needs (drained, or left by a push that died), load again
               what should serve but the server forgot (a restarted vLLM keeps no runtime LoRA)

Calls route to a name only while its row is `loaded` and its version is the task's deployed
one (serve/remote_calls.py), so the pointer alone decides what serves: a crash at any step
leaves the old or the new version serving, and a server that lost a name only sends calls
back in process until `reconcile` loads it again. A name is content-addressed
(`<task dir>-v<N>-<8 hex of the weights>`): two stores sharing a server never collide, and
"already loaded" under that name means these weights, so a retried push is harmless.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

from ..errors import AdapterLoadError, MtllmError
from .policy import VLLMSettings
from .registry import AdapterVersion, Registry, _alive
from .task import task_dirname
from .vllm_target import VLLMError, VLLMTarget, server_root

# learn/ judges a loaded name on the server: (deployer, name, version) -> {"passed": bool, "reason": str, ...}
TargetGate = Callable[["Deployer", str, AdapterVersion], dict]


class RemoteError(MtllmError):
    """A version cannot be served by the vLLM server (not loadable, not listed, judged worse there)."""


def loaded_names(registry: Registry) -> dict[tuple[str, str], str]:
    """(target, adapter_id) -> the name it is loaded under, for every loaded version."""
    rows = registry.store.rows("SELECT target, adapter_id, name FROM remote_adapters WHERE state='loaded' "
                               "ORDER BY updated_at")
    return {(r["target"], r["adapter_id"]): r["name"] for r in rows}


class Deployer:
    def __init__(self, registry: Registry, settings: VLLMSettings, target: VLLMTarget | None = None):
        if not settings.active:
            raise RemoteError("no vLLM server is configured (vllm.base_url) or it is disabled")
        self.registry = registry
        self.store = registry.store
        self.settings = settings
        self.target = target or VLLMTarget(settings.base_url, api_key=settings.api_key(),
                                           timeout=max(120.0, settings.timeout_s))
        self.key = server_root(settings.base_url)

    # ------------------------------------------------------------------ names and paths
    @staticmethod
    def name_for(v: AdapterVersion) -> str:
        weights = Path(v.path) / "peft" / "adapter_model.safetensors"
        try:
            digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:8]
        except OSError as e:
            raise RemoteError(f"{v.adapter_id} has no PEFT export to push ({weights}): {e}") from e
        return f"{task_dirname(v.task_key)}-v{v.version}-{digest}"

    def server_path(self, local: Path) -> str:
        """Where the server reads `local` (vLLM loads adapters by path, from its own file system)."""
        if not self.settings.server_adapter_dir:
            return str(local)
        try:
            rel = local.resolve().relative_to(self.registry.root.resolve())
        except ValueError:
            raise RemoteError(f"{local} is not under the registry {self.registry.root}: cannot map it to "
                              f"server_adapter_dir") from None
        return str(Path(self.settings.server_adapter_dir) / rel)

    def serving_name(self, v: AdapterVersion | None) -> str | None:
        """The model name that serves `v` on this server now (None: not loaded there). The base
        model and demonstrations-only versions are served by the base, `served_base`."""
        if v is None or not v.serves_adapter:
            return self.settings.served_base
        return loaded_names(self.registry).get((self.key, v.adapter_id))

    # ------------------------------------------------------------------ push
    def load(self, v: AdapterVersion) -> str:
        """Load `v` on the server and return its name once the server lists it (nothing routes
        to it before its version is the deployed one)."""
        if not v.serves_adapter:
            if not self.settings.served_base:
                raise RemoteError(f"{v.adapter_id} serves the base model with demonstrations: set vllm.served_base "
                                  f"(the model id the server serves the base under)")
            self._require_listed(self.settings.served_base)
            return self.settings.served_base
        peft = Path(v.path) / "peft"
        name = self.name_for(v)
        self._set(v, name, "loading", pid=os.getpid())
        try:
            try:
                self.target.deploy(name, peft, self.server_path(peft))
            except AdapterLoadError as e:
                if "already been loaded" not in str(e):
                    raise
            self._require_listed(name)
            if self.settings.served_base:
                self._require_listed(self.settings.served_base)
        except BaseException as e:
            self._set(v, name, "failed", error=str(e))
            self._unload_quietly(name)
            raise
        self._set(v, name, "loaded")
        return name

    def push(self, v: AdapterVersion, gate: TargetGate | None = None) -> tuple[str, dict | None]:
        """Load `v` and judge it on the server (if `gate` and `settings.gate`): (name, verdict).
        A rejected name is unloaded again; the caller promotes only on a pass."""
        self.reconcile_quietly()
        name = self.load(v)
        verdict = None
        if gate is not None and self.settings.gate:
            try:
                verdict = gate(self, name, v)
            except Exception as e:
                verdict = {"passed": False, "failed": True, "reason": f"target gate failed: {type(e).__name__}: {e}"}
            with self.store.transaction() as db:
                db.execute("UPDATE remote_adapters SET gate_json=? WHERE target=? AND name=?",
                           (json.dumps(verdict), self.key, name))
            if not verdict.get("passed") and v.serves_adapter:
                self._unload_quietly(name)
                self._set(v, name, "unloaded", error=f"target gate: {verdict.get('reason')}")
        return name, verdict

    def rollback(self, task_key: str, base: str, *, note: str = "") -> str | None:
        """Registry.rollback, with the version rolled back to loaded on the server first where it
        can be (if it cannot, the task is served in process: a rollback never waits on a server)."""
        previous = self.registry.rollback_target(task_key, base)
        if previous is not None:
            v = self.registry.get(previous)
            if v.serves_adapter and self.serving_name(v) is None:
                try:
                    self.load(v)
                except Exception:
                    pass
        now_serving = self.registry.rollback(task_key, base, note=note)
        self.retire_others(task_key)
        return now_serving

    # ------------------------------------------------------------------ switch and drain
    def retire_others(self, task_key: str) -> None:
        """After the task's pointer moved: its other names are retired (unloaded once drained),
        and the deployed version's name, if it was retired, serves again."""
        deployed = {r["adapter_id"] for r in self.store.rows(
            "SELECT adapter_id FROM deployments WHERE task_key=? AND adapter_id IS NOT NULL", (task_key,))}
        now = time.time()
        with self.store.transaction() as db:
            for r in db.execute("SELECT name, adapter_id, retired_at FROM remote_adapters "
                                "WHERE target=? AND task_key=? AND state='loaded'", (self.key, task_key)).fetchall():
                name, adapter_id, retired_at = r
                if adapter_id in deployed and retired_at is not None:
                    db.execute("UPDATE remote_adapters SET retired_at=NULL, updated_at=? WHERE target=? AND name=?",
                               (now, self.key, name))
                elif adapter_id not in deployed and retired_at is None:
                    db.execute("UPDATE remote_adapters SET retired_at=?, updated_at=? WHERE target=? AND name=?",
                               (now, now, self.key, name))

    def reconcile(self, *, drain_s: float | None = None) -> dict[str, list[str]]:
        """Make the server hold what the registry says: unload drained and orphaned names, load
        again the deployed ones it lost. Raises VLLMError when the server cannot be reached."""
        drain = self.settings.drain_s if drain_s is None else drain_s
        served = set(self.target.served_models())
        deployed = {r["adapter_id"] for r in self.store.rows(
            "SELECT adapter_id FROM deployments WHERE adapter_id IS NOT NULL")}
        done: dict[str, list[str]] = {"unloaded": [], "reloaded": [], "failed": []}
        now = time.time()
        for r in self.store.rows("SELECT * FROM remote_adapters WHERE target=? AND state IN ('loading','loaded')",
                                 (self.key,)):
            name, adapter_id = r["name"], r["adapter_id"]
            if r["state"] == "loading":
                if r["pid"] == os.getpid() or _alive(r["pid"]):
                    continue  # a push in progress
                self._unload_quietly(name)
                self._set_state(name, "failed", "the pushing process died before the server listed it")
                done["unloaded"].append(name)
            elif adapter_id in deployed:
                if name not in served:  # the server restarted, or someone unloaded it
                    try:
                        self.load(self.registry.get(adapter_id))
                        done["reloaded"].append(name)
                    except Exception as e:
                        done["failed"].append(f"{name}: {e}")
            elif r["retired_at"] is None:
                self.retire_others(r["task_key"])  # the pointer moved without us (a rollback elsewhere)
            elif now - r["retired_at"] >= drain:
                try:
                    if name in served:
                        self.target.unload(name)
                    self._set(self.registry.get(adapter_id), name, "unloaded")
                    done["unloaded"].append(name)
                except VLLMError as e:
                    done["failed"].append(f"{name}: {e}")
        return done

    def reconcile_quietly(self) -> None:
        try:
            self.reconcile()
        except Exception:
            pass  # the push that follows reports an unreachable server itself

    # ------------------------------------------------------------------ rows
    def _set(self, v: AdapterVersion, name: str, state: str, *, pid: int | None = None,
             error: str | None = None) -> None:
        with self.store.transaction() as db:
            db.execute("INSERT INTO remote_adapters (target, name, task_key, adapter_id, state, pid, updated_at, error) "
                       "VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(target, name) DO UPDATE SET state=excluded.state, "
                       "pid=COALESCE(excluded.pid, pid), updated_at=excluded.updated_at, error=excluded.error, "
                       "retired_at=NULL",
                       (self.key, name, v.task_key, v.adapter_id, state, pid, time.time(), error))
            if state in ("loaded", "unloaded"):
                db.execute("INSERT INTO deploy_log (task_key, base, action, adapter_id, previous, created_at, note) "
                           "VALUES (?,?,?,?,?,?,?)", (v.task_key, v.base, f"remote-{state[:-2]}", v.adapter_id, None,
                                                      time.time(), f"{self.key} {name}" + (f": {error}" if error else "")))

    def _set_state(self, name: str, state: str, error: str | None) -> None:
        with self.store.transaction() as db:
            db.execute("UPDATE remote_adapters SET state=?, error=COALESCE(?, error), updated_at=? "
                       "WHERE target=? AND name=?", (state, error, time.time(), self.key, name))

    def _require_listed(self, name: str) -> None:
        if name not in self.target.served_models():
            raise RemoteError(f"vLLM at {self.key} does not serve {name!r} (GET /v1/models)")

    def _unload_quietly(self, name: str) -> None:
        try:
            self.target.unload(name)
        except Exception:
            pass

    def rows(self) -> list[dict]:
        return self.store.rows("SELECT * FROM remote_adapters WHERE target=? ORDER BY updated_at", (self.key,))
