"""Versioned adapters per task, and which one serves it.

A version is reserved before training starts (so its number is never reused, even
if training dies), trained into a temporary directory that is renamed into place
when complete, and never changed afterwards. `deployments` holds one pointer per
(task, base model); promote and rollback change it in one SQLite transaction and log
the change, so a crash at any moment leaves either the old or the new pointer, and
the pointer only ever names a complete adapter.

    <store dir>/adapters/<task>/v<N>/adapter.gguf, peft/, manifest.json, data.jsonl
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MtllmError
from .store import Store


class RegistryError(MtllmError):
    """A registry operation is not possible (busy, unknown version, incomplete adapter)."""


@dataclass(frozen=True)
class AdapterVersion:
    adapter_id: str
    task_key: str
    version: int
    base: str
    status: str
    created_at: float
    path: str | None
    parent: str | None
    config: dict
    data: dict
    metrics: dict
    error: str | None
    finished_at: float | None = None
    pid: int | None = None

    @property
    def gguf_path(self) -> Path:
        return Path(self.path) / "adapter.gguf"

    @property
    def score(self) -> float | None:
        return self.metrics.get("candidate_score")

    @classmethod
    def from_row(cls, r: dict) -> "AdapterVersion":
        return cls(adapter_id=r["adapter_id"], task_key=r["task_key"], version=r["version"], base=r["base"],
                   status=r["status"], created_at=r["created_at"], path=r["path"], parent=r["parent"],
                   config=json.loads(r["config_json"] or "{}"), data=json.loads(r["data_json"] or "{}"),
                   metrics=json.loads(r["metrics_json"] or "{}"), error=r["error"], finished_at=r["finished_at"],
                   pid=r["pid"])


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def task_dirname(task_key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", task_key)


class Registry:
    def __init__(self, store: Store, root: str | os.PathLike | None = None):
        self.store = store
        self.root = Path(root) if root is not None else store.path.parent / "adapters"

    # ------------------------------------------------------------------ reads
    def get(self, adapter_id: str) -> AdapterVersion:
        rows = self.store.rows("SELECT * FROM adapters WHERE adapter_id=?", (adapter_id,))
        if not rows:
            raise RegistryError(f"no adapter version {adapter_id!r}")
        return AdapterVersion.from_row(rows[0])

    def versions(self, task_key: str | None = None) -> list[AdapterVersion]:
        q, a = ("SELECT * FROM adapters WHERE task_key=? ORDER BY version", (task_key,)) if task_key else \
            ("SELECT * FROM adapters ORDER BY task_key, version", ())
        return [AdapterVersion.from_row(r) for r in self.store.rows(q, a)]

    def deployed(self, task_key: str, base: str) -> AdapterVersion | None:
        rows = self.store.rows("SELECT adapter_id FROM deployments WHERE task_key=? AND base=?", (task_key, base))
        return self.get(rows[0]["adapter_id"]) if rows and rows[0]["adapter_id"] else None

    def deployments(self) -> list[dict]:
        return self.store.rows("SELECT * FROM deployments ORDER BY task_key")

    def log(self, task_key: str | None = None) -> list[dict]:
        if task_key:
            return self.store.rows("SELECT * FROM deploy_log WHERE task_key=? ORDER BY id", (task_key,))
        return self.store.rows("SELECT * FROM deploy_log ORDER BY id")

    def training(self) -> AdapterVersion | None:
        """The training in progress anywhere on this store, if any."""
        self.reap()
        rows = self.store.rows("SELECT * FROM adapters WHERE status='training' ORDER BY created_at LIMIT 1")
        return AdapterVersion.from_row(rows[0]) if rows else None

    def last_started(self) -> float:
        rows = self.store.rows("SELECT MAX(created_at) AS t FROM adapters")
        return rows[0]["t"] or 0.0

    # ------------------------------------------------------------------ training lifecycle
    def reserve(self, task_key: str, base: str, *, config: dict | None = None, pid: int | None = None) -> AdapterVersion:
        """Claim the next version number for a training; refused while another training
        is alive on this store (one training at a time, across processes)."""
        self.reap()
        with self.store.transaction() as db:
            busy = db.execute("SELECT adapter_id, pid FROM adapters WHERE status='training'").fetchall()
            if any(_alive(pid_) for _, pid_ in busy):
                raise RegistryError(f"a training is already running: {busy[0][0]}")
            (last,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM adapters WHERE task_key=?",
                                 (task_key,)).fetchone()
            version = last + 1
            adapter_id = f"{task_key}@v{version}"
            parent = db.execute("SELECT adapter_id FROM deployments WHERE task_key=? AND base=?",
                                (task_key, base)).fetchone()
            path = self.root / task_dirname(task_key) / f"v{version}"
            db.execute("INSERT INTO adapters (adapter_id, task_key, version, base, status, created_at, pid, path, "
                       "parent, config_json) VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (adapter_id, task_key, version, base, "training", time.time(), pid or os.getpid(), str(path),
                        parent[0] if parent else None, json.dumps(config or {})))
        return self.get(adapter_id)

    def claim(self, adapter_id: str, pid: int) -> None:
        """The training process takes over a reservation made for it."""
        with self.store.transaction() as db:
            db.execute("UPDATE adapters SET pid=? WHERE adapter_id=? AND status='training'", (pid, adapter_id))

    def staging_dir(self, v: AdapterVersion) -> Path:
        d = Path(v.path).with_name(Path(v.path).name + f".tmp{os.getpid()}")
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def publish(self, v: AdapterVersion, staging: Path, *, data: dict, metrics: dict) -> AdapterVersion:
        """Staged files become the version's immutable directory; then the row says so."""
        final = Path(v.path)
        if final.exists():  # left by a training that died between rename and commit
            shutil.rmtree(final)
        manifest = {"adapter_id": v.adapter_id, "task_key": v.task_key, "version": v.version, "base": v.base,
                    "parent": v.parent, "config": v.config, "data": data, "train_metrics": metrics,
                    "created_at": v.created_at}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        _fsync_tree(staging)
        os.replace(staging, final)
        with self.store.transaction() as db:
            db.execute("UPDATE adapters SET data_json=?, metrics_json=? WHERE adapter_id=? AND status='training'",
                       (json.dumps(data), json.dumps(metrics), v.adapter_id))
        return self.get(v.adapter_id)

    def finish(self, adapter_id: str, status: str, *, metrics: dict | None = None, error: str | None = None) -> None:
        if status not in ("passed", "rejected", "failed", "cancelled"):
            raise ValueError(status)
        with self.store.transaction() as db:
            old = db.execute("SELECT metrics_json FROM adapters WHERE adapter_id=?", (adapter_id,)).fetchone()
            merged = {**json.loads((old[0] if old else None) or "{}"), **(metrics or {})}
            db.execute("UPDATE adapters SET status=?, metrics_json=?, error=?, finished_at=? WHERE adapter_id=?",
                       (status, json.dumps(merged), error, time.time(), adapter_id))

    def reap(self) -> list[str]:
        """Trainings whose process is gone become `failed`; their staging dirs are removed."""
        dead = [r for r in self.store.rows("SELECT adapter_id, pid, path FROM adapters WHERE status='training'")
                if not _alive(r["pid"])]
        for r in dead:
            with self.store.transaction() as db:
                db.execute("UPDATE adapters SET status='failed', error=COALESCE(error, ?), finished_at=? "
                           "WHERE adapter_id=? AND status='training'",
                           ("the training process ended without finishing", time.time(), r["adapter_id"]))
            if r["path"]:
                p = Path(r["path"])
                for tmp in p.parent.glob(p.name + ".tmp*"):
                    shutil.rmtree(tmp, ignore_errors=True)
        return [r["adapter_id"] for r in dead]

    # ------------------------------------------------------------------ deploy pointer
    def promote(self, adapter_id: str, *, expect: str | None | bool = False, note: str = "") -> bool:
        """Point the task at this version. With `expect` (an adapter id or None for the
        base), only if the pointer still names it: a gate's verdict was measured against
        that version, and a manual promote or rollback in between wins."""
        v = self.get(adapter_id)
        if v.status not in ("passed", "rejected"):  # a person may overrule the gate, not promote half a file
            raise RegistryError(f"{adapter_id} is {v.status}; only a complete, evaluated version can be promoted")
        if not v.gguf_path.is_file():
            raise RegistryError(f"{adapter_id}: {v.gguf_path} is missing")
        with self.store.transaction() as db:
            row = db.execute("SELECT adapter_id FROM deployments WHERE task_key=? AND base=?",
                             (v.task_key, v.base)).fetchone()
            current = row[0] if row else None
            if expect is not False and current != expect:
                return False
            db.execute("INSERT INTO deployments (task_key, base, adapter_id, updated_at) VALUES (?,?,?,?) "
                       "ON CONFLICT(task_key, base) DO UPDATE SET adapter_id=excluded.adapter_id, "
                       "updated_at=excluded.updated_at", (v.task_key, v.base, adapter_id, time.time()))
            db.execute("INSERT INTO deploy_log (task_key, base, action, adapter_id, previous, created_at, note) "
                       "VALUES (?,?,?,?,?,?,?)", (v.task_key, v.base, "promote", adapter_id, current, time.time(), note))
        return True

    def rollback(self, task_key: str, base: str, *, note: str = "") -> str | None:
        """Serve the task with what served it before the current version was promoted
        (an earlier adapter, or the base model). Returns the version now serving."""
        with self.store.transaction() as db:
            row = db.execute("SELECT adapter_id FROM deployments WHERE task_key=? AND base=?",
                             (task_key, base)).fetchone()
            current = row[0] if row else None
            if current is None:
                raise RegistryError(f"{task_key}: the base model already serves it; nothing to roll back")
            prev = db.execute("SELECT previous FROM deploy_log WHERE task_key=? AND base=? AND action='promote' "
                              "AND adapter_id=? ORDER BY id DESC LIMIT 1", (task_key, base, current)).fetchone()
            target = prev[0] if prev else None
            db.execute("UPDATE deployments SET adapter_id=?, updated_at=? WHERE task_key=? AND base=?",
                       (target, time.time(), task_key, base))
            db.execute("INSERT INTO deploy_log (task_key, base, action, adapter_id, previous, created_at, note) "
                       "VALUES (?,?,?,?,?,?,?)", (task_key, base, "rollback", target, current, time.time(), note))
        return target

    def rolled_back(self, task_key: str, base: str) -> set[str]:
        return {r["previous"] for r in self.store.rows(
            "SELECT previous FROM deploy_log WHERE task_key=? AND base=? AND action='rollback'", (task_key, base))}


def _fsync_tree(d: Path) -> None:
    for p in d.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def describe(v: AdapterVersion) -> dict[str, Any]:
    return {"adapter_id": v.adapter_id, "version": v.version, "status": v.status, "base": v.base,
            "created_at": v.created_at, "parent": v.parent, "score": v.score,
            "baseline_score": v.metrics.get("baseline_score"), "n_train": v.data.get("n_train"),
            "n_heldout": v.data.get("n_heldout"), "error": v.error}
