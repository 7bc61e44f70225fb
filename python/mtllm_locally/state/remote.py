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

from .. import models
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
        self._base: str | None = None

    @property
    def base(self) -> str:
        """The fingerprint of the local model the server's base was exported from (`model`)."""
        if self._base is None:
            self._base = models.fingerprint(models.resolve(self.settings.model))
        return self._base

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
    def load(self, v: AdapterVersion, *, state: str = "loaded") -> str:
        """Load `v` on the server and return its name once the server lists it; the row is left
        in `state` ("loading" while a push still judges it: reconcile leaves it alone while its
        process lives). Nothing routes to a name before its version is the deployed one."""
        if v.base != self.base:
            raise RemoteError(f"{v.adapter_id} was trained on {v.base}; the server's base is {self.settings.model!r} "
                              f"({self.base}): set vllm.model to the model the server's base was exported from")
        if not v.serves_adapter:
            if not self.settings.served_base:
                raise RemoteError(f"{v.adapter_id} serves the base model with demonstrations: set vllm.served_base "
                                  f"(the model id the server serves the base under)")
            self._require_listed(self.settings.served_base)
            return self.settings.served_base
        peft = Path(v.path) / "peft"
        name = self.name_for(v)
        if self._state(name) == "loaded" and name in self.target.served_models():
            return name  # already serving (a retried push, or the deployed version itself): leave it be
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
        if state != "loading":
            self._set(v, name, state)
        return name

    def push(self, v: AdapterVersion, gate: TargetGate | None = None) -> tuple[str, dict | None]:
        """Load `v` and judge it on the server (if `gate` and `settings.gate`): (name, verdict).
        The row says `loading` until the verdict (so no reconcile elsewhere takes the name away
        meanwhile), then `loaded`; a rejected name is unloaded again unless it already serves
        the task. The caller promotes only on a pass."""
        self.reconcile_quietly()
        name = self.load(v, state="loading")
        verdict = None
        if gate is not None and self.settings.gate:
            try:
                verdict = gate(self, name, v)
            except Exception as e:
                verdict = {"passed": False, "failed": True, "reason": f"target gate failed: {type(e).__name__}: {e}"}
        if not v.serves_adapter:
            return name, verdict
        with self.store.transaction() as db:
            db.execute("UPDATE remote_adapters SET gate_json=? WHERE target=? AND name=?",
                       (json.dumps(verdict), self.key, name))
        deployed = self._deployed_ids()
        if verdict is None or verdict.get("passed") or v.adapter_id in deployed:
            self._set(v, name, "loaded")
        else:
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

    def reconcile(self, *, drain_s: float | None = None, tasks: set[str] | None = None) -> dict[str, list[str]]:
        """Make the server hold what the registry says: unload drained names and those a dead
        push left, load again deployed ones it lost (a restart), and load the deployed versions
        of `tasks` (the tasks this server serves) that it never had (promoted before it was
        configured, or while it was down). Raises VLLMError when the server cannot be reached."""
        drain = self.settings.drain_s if drain_s is None else drain_s
        served = set(self.target.served_models())
        done: dict[str, list[str]] = {"unloaded": [], "reloaded": [], "loaded": [], "failed": []}
        now = time.time()
        for r in self.store.rows("SELECT * FROM remote_adapters WHERE target=? AND state IN "
                                 "('loading','loaded','unloading')", (self.key,)):
            name, adapter_id = r["name"], r["adapter_id"]
            try:
                if r["state"] == "loading":
                    if r["pid"] == os.getpid() or _alive(r["pid"]):
                        continue  # a push in progress (loading, or being judged)
                    self._unload_quietly(name)
                    self._set_state(name, "failed", "the pushing process died before it finished")
                    done["unloaded"].append(name)
                elif r["state"] == "unloading":  # an unload that failed before: again
                    self._unload(r, name, served, done)
                elif adapter_id in self._deployed_ids():
                    if name not in served:  # the server restarted, or someone unloaded it
                        self.load(self.registry.get(adapter_id))
                        done["reloaded"].append(name)
                elif r["retired_at"] is None:
                    self.retire_others(r["task_key"])  # the pointer moved without us (a rollback elsewhere)
                elif now - r["retired_at"] >= drain and self._claim_unload(name):
                    self._unload(r, name, served, done)
            except Exception as e:
                done["failed"].append(f"{name}: {type(e).__name__}: {e}")
        for v in self._missing(tasks or set()):
            try:
                done["loaded"].append(self.load(v))
            except Exception as e:
                done["failed"].append(f"{v.adapter_id}: {type(e).__name__}: {e}")
        return done

    def _missing(self, tasks: set[str]) -> list[AdapterVersion]:
        """Deployed adapter versions of `tasks` on this server's base with no name there."""
        out = []
        for r in self.store.rows("SELECT task_key, adapter_id FROM deployments WHERE adapter_id IS NOT NULL "
                                 "AND base=?", (self.base,)):
            if r["task_key"] in tasks and not self.store.rows(
                    "SELECT 1 FROM remote_adapters WHERE target=? AND adapter_id=? AND state IN ('loading','loaded')",
                    (self.key, r["adapter_id"])):
                v = self.registry.get(r["adapter_id"])
                if v.serves_adapter:
                    out.append(v)
        return out

    def _claim_unload(self, name: str) -> bool:
        """Take a drained name for unloading, in one transaction with the check that its version
        is still not deployed (a promote or rollback since may have made it serve again)."""
        with self.store.transaction() as db:
            cur = db.execute("UPDATE remote_adapters SET state='unloading', updated_at=? WHERE target=? AND name=? "
                             "AND state='loaded' AND retired_at IS NOT NULL AND adapter_id NOT IN "
                             "(SELECT adapter_id FROM deployments WHERE adapter_id IS NOT NULL)",
                             (time.time(), self.key, name))
            return cur.rowcount == 1

    def _unload(self, r: dict, name: str, served: set[str], done: dict) -> None:
        if name in served:
            self.target.unload(name)
        self._set(self.registry.get(r["adapter_id"]), name, "unloaded")
        done["unloaded"].append(name)

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

    def _state(self, name: str) -> str | None:
        rows = self.store.rows("SELECT state FROM remote_adapters WHERE target=? AND name=?", (self.key, name))
        return rows[0]["state"] if rows else None

    def _deployed_ids(self) -> set[str]:
        return {r["adapter_id"] for r in self.store.rows(
            "SELECT adapter_id FROM deployments WHERE adapter_id IS NOT NULL")}

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
