"""Versioned adapters per task, and which one serves it.

A version is reserved before training starts (so its number is never reused, even
if training dies), trained into a temporary directory that is renamed into place
when complete, and never changed afterwards. `deployments` holds one pointer per
(task, base model); promote and rollback change it in one SQLite transaction and log
the change, so a crash at any moment leaves either the old or the new pointer, and
the pointer only ever names a complete adapter.

    <store dir>/adapters/<task dir>/v<N>/adapter.gguf, peft/, manifest.json, data.jsonl

A task's directory is `task.task_dirname(task_key)`; each row stores its path, so
versions made under an older layout keep theirs.

A reservation records its owner (host, pid, the process's boot id and start time, a
heartbeat the training process renews). One whose owner is dead, or silent for
`stale_after_s`, is reclaimed (marked failed) by whoever looks next, so a crashed or
wedged training never blocks the store; `mtllm-locally release` clears one by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import demonstrations
from ..errors import MtllmError
from .files import make_private, private_dir
from .policy import TaskPolicy
from .store import Store
from .task import task_dirname


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
    owner_host: str | None = None
    owner_start: str | None = None
    heartbeat_at: float | None = None

    @property
    def gguf_path(self) -> Path:
        return Path(self.path) / "adapter.gguf"

    @property
    def score(self) -> float | None:
        return self.metrics.get("candidate_score")

    # What serving this version means, as the gate chose it: the LoRA adapter, the
    # demonstrations in the prompt, or both. (Versions made before demonstrations: the adapter.)
    @property
    def serves_adapter(self) -> bool:
        serves = self.metrics.get("serves")
        return self.kind == "training" if serves is None else bool(serves.get("adapter"))

    @property
    def serves_demonstrations(self) -> bool:
        return bool((self.metrics.get("serves") or {}).get("demonstrations"))

    @property
    def demonstrations_path(self) -> Path:
        return Path(self.path) / demonstrations.FILE

    @property
    def kind(self) -> str:
        """"training" (a LoRA is trained, demonstrations chosen too) or "demonstrations" (chosen only)."""
        return self.config.get("kind", "training")

    # What a training was started with (`config`, written by `Registry.reserve`).
    @property
    def policy(self) -> TaskPolicy:
        return TaskPolicy(**self.config.get("policy", {}))

    @property
    def model_path(self) -> str | None:
        return self.config.get("model_path")

    @property
    def training_threads(self) -> int:
        """Cores this training holds while it runs (a budget of 0 means all of them)."""
        return max(1, self.policy.threads or (os.cpu_count() or 1))

    @classmethod
    def from_row(cls, r: dict) -> "AdapterVersion":
        return cls(adapter_id=r["adapter_id"], task_key=r["task_key"], version=r["version"], base=r["base"],
                   status=r["status"], created_at=r["created_at"], path=r["path"], parent=r["parent"],
                   config=json.loads(r["config_json"] or "{}"), data=json.loads(r["data_json"] or "{}"),
                   metrics=json.loads(r["metrics_json"] or "{}"), error=r["error"], finished_at=r["finished_at"],
                   pid=r["pid"], owner_host=r.get("owner_host"), owner_start=r.get("owner_start"),
                   heartbeat_at=r.get("heartbeat_at"))


STALE_AFTER_S = 600.0   # a training not heard from for this long is presumed wedged (it beats every 30 s)
HEARTBEAT_S = 30.0


def _host() -> str:
    """This machine's name (uname: the same as socket.gethostname(), without going
    through the socket module, which a network audit rightly flags)."""
    return os.uname().nodename


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


_BOOT = _boot_id()


def _proc_start(pid: int | None) -> str | None:
    """A process's identity beyond its pid (pids are reused): boot id + start time, or
    None where /proc cannot tell."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f"{_BOOT}:{f.read().rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return None


def _alive(pid: int | None, start: str | None = None) -> bool:
    """Whether the process is running on this host (a zombie is not; nor is a process
    that merely reuses the pid of the one that started at `start`)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # a zombie child is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[-1].split()[0] == "Z":
                return False
    except OSError:
        return True
    if start is not None:
        now = _proc_start(pid)
        return now is None or now == start
    return True


def _gone(r: dict, now: float, stale_after_s: float) -> str | None:
    """Why a `training` reservation's owner can no longer finish it, or None if it may."""
    if r.get("owner_host") in (None, _host()) and not _alive(r["pid"], r.get("owner_start")):
        return f"the training process (pid {r['pid']}) ended without finishing"
    silent = now - (r.get("heartbeat_at") or r["created_at"])
    if silent > stale_after_s:
        return (f"the training process (pid {r['pid']} on {r.get('owner_host') or 'this host'}) was not heard "
                f"from for {silent:.0f} s (> {stale_after_s:.0f} s)")
    return None


def _dicts(cur) -> list[dict]:
    cols = [c[0] for c in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


class Registry:
    def __init__(self, store: Store, root: str | os.PathLike | None = None, *,
                 stale_after_s: float = STALE_AFTER_S):
        self.store = store
        self.root = Path(root) if root is not None else store.path.parent / "adapters"
        self.stale_after_s = stale_after_s

    def task_dir(self, task_key: str) -> Path:
        return self.root / task_dirname(task_key)

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

    def serving(self) -> dict[tuple[str, str], AdapterVersion]:
        """(task, base) -> the version deployed for it, for every task an adapter serves."""
        rows = self.store.rows("SELECT a.* FROM deployments d JOIN adapters a ON a.adapter_id=d.adapter_id")
        return {(r["task_key"], r["base"]): AdapterVersion.from_row(r) for r in rows}

    def trainings(self) -> list[AdapterVersion]:
        """Reservations in training, as recorded (a read only: reclaiming is `reap`'s job)."""
        return [AdapterVersion.from_row(r) for r in self.store.rows(
            "SELECT * FROM adapters WHERE status='training' ORDER BY created_at")]

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
    def reserve(self, task_key: str, base: str, *, config: dict | None = None, pid: int | None = None,
                policy: TaskPolicy | None = None, model_path: str | None = None,
                function: str | None = None) -> AdapterVersion:
        """Claim the next version number for a training; refused while another training
        is alive on this store (one training at a time, across processes). A reservation
        whose owner is gone is reclaimed here first. `policy`, `model_path` and `function`
        are what the training runs with (kept in `config`, read back as properties)."""
        config = dict(config or {})
        if policy is not None:
            config["policy"] = asdict(policy)
        if model_path is not None:
            config["model_path"] = str(model_path)
        if function is not None:
            config["function"] = function
        pid = pid or os.getpid()
        path = self.task_dir(task_key)
        with self.store.transaction() as db:
            now = time.time()
            reclaimed = []
            for r in _dicts(db.execute("SELECT * FROM adapters WHERE status='training'")):
                why = _gone(r, now, self.stale_after_s)
                if why is None:
                    raise RegistryError(f"a training is already running: {r['adapter_id']}")
                self._fail(db, r, why, now)
                reclaimed.append(r)
            # Another task in this directory (a hash collision, or a name from an older layout):
            # never share, publishing would replace its files.
            prefix = str(path) + os.sep
            other = db.execute("SELECT adapter_id FROM adapters WHERE task_key!=? AND substr(path, 1, ?)=? LIMIT 1",
                               (task_key, len(prefix), prefix)).fetchone()
            if other:
                raise RegistryError(f"{path} already holds {other[0]}, another task; not sharing it")
            (last,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM adapters WHERE task_key=?",
                                 (task_key,)).fetchone()
            version = last + 1
            adapter_id = f"{task_key}@v{version}"
            parent = db.execute("SELECT adapter_id FROM deployments WHERE task_key=? AND base=?",
                                (task_key, base)).fetchone()
            db.execute("INSERT INTO adapters (adapter_id, task_key, version, base, status, created_at, pid, path, "
                       "parent, config_json, owner_host, owner_start, heartbeat_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (adapter_id, task_key, version, base, "training", now, pid, str(path / f"v{version}"),
                        parent[0] if parent else None, json.dumps(config or {}), _host(), _proc_start(pid), now))
        for r in reclaimed:
            self._remove_staging(r)
        return self.get(adapter_id)

    def claim(self, adapter_id: str, pid: int) -> bool:
        """The training process takes over a reservation made for it. False if the
        reservation is no longer in training (it was reclaimed or released)."""
        with self.store.transaction() as db:
            cur = db.execute("UPDATE adapters SET pid=?, owner_host=?, owner_start=?, heartbeat_at=? "
                             "WHERE adapter_id=? AND status='training'",
                             (pid, _host(), _proc_start(pid), time.time(), adapter_id))
            return cur.rowcount > 0

    def heartbeat(self, adapter_id: str, pid: int | None = None) -> bool:
        """The training process is alive and working. False if it no longer holds the
        reservation (reclaimed or released): it should stop."""
        with self.store.transaction() as db:
            cur = db.execute("UPDATE adapters SET heartbeat_at=? WHERE adapter_id=? AND status='training' AND pid=?",
                             (time.time(), adapter_id, pid or os.getpid()))
            return cur.rowcount > 0

    def staging_dir(self, v: AdapterVersion) -> Path:
        d = Path(v.path).with_name(Path(v.path).name + f".tmp{os.getpid()}")
        shutil.rmtree(d, ignore_errors=True)
        private_dir(d.parent)
        d.mkdir(mode=0o700)
        make_private(d)
        return d

    def publish(self, v: AdapterVersion, staging: Path, *, data: dict, metrics: dict) -> AdapterVersion:
        """Staged files become the version's immutable directory; then the row says so."""
        final = Path(v.path)
        with self.store.transaction() as db:
            row = db.execute("SELECT status FROM adapters WHERE adapter_id=?", (v.adapter_id,)).fetchone()
            other = db.execute("SELECT adapter_id FROM adapters WHERE path=? AND adapter_id!=? LIMIT 1",
                               (str(final), v.adapter_id)).fetchone()
        if not row or row[0] != "training":
            raise RegistryError(f"{v.adapter_id} is {row[0] if row else 'gone'}: its reservation was released")
        if other:
            raise RegistryError(f"{final} belongs to {other[0]}; not replacing it")
        if final.exists():  # left by a training that died between rename and commit: ours, or nobody's
            try:
                owner = json.loads((final / "manifest.json").read_text()).get("adapter_id")
            except (OSError, ValueError, AttributeError):
                owner = None
            if owner not in (None, v.adapter_id):
                raise RegistryError(f"{final} holds {owner}; not replacing it with {v.adapter_id}")
            shutil.rmtree(final)
        manifest = {"adapter_id": v.adapter_id, "task_key": v.task_key, "version": v.version, "base": v.base,
                    "parent": v.parent, "config": v.config, "data": data, "train_metrics": metrics,
                    "created_at": v.created_at}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        make_private(staging)
        _fsync_tree(staging)
        os.replace(staging, final)
        with self.store.transaction() as db:
            db.execute("UPDATE adapters SET data_json=?, metrics_json=? WHERE adapter_id=? AND status='training'",
                       (json.dumps(data), json.dumps(metrics), v.adapter_id))
        return self.get(v.adapter_id)

    def finish(self, adapter_id: str, status: str, *, metrics: dict | None = None, error: str | None = None) -> bool:
        """A training's outcome. Only a reservation still in training changes: one
        reclaimed or released meanwhile stays as it was (returns False)."""
        if status not in ("passed", "rejected", "failed", "cancelled"):
            raise ValueError(status)
        with self.store.transaction() as db:
            old = db.execute("SELECT metrics_json FROM adapters WHERE adapter_id=?", (adapter_id,)).fetchone()
            merged = {**json.loads((old[0] if old else None) or "{}"), **(metrics or {})}
            cur = db.execute("UPDATE adapters SET status=?, metrics_json=?, error=?, finished_at=? "
                             "WHERE adapter_id=? AND status='training'",
                             (status, json.dumps(merged), error, time.time(), adapter_id))
            return cur.rowcount > 0

    def reap(self, stale_after_s: float | None = None) -> list[str]:
        """Reservations whose owner is gone (its process dead, or silent for
        `stale_after_s`) become `failed`; their staging dirs are removed."""
        stale = self.stale_after_s if stale_after_s is None else stale_after_s
        now = time.time()
        gone = [(r, why) for r in self.store.rows("SELECT * FROM adapters WHERE status='training'")
                if (why := _gone(r, now, stale))]
        reaped = []
        for r, why in gone:
            with self.store.transaction() as db:
                if not self._fail(db, r, why, now):
                    continue  # claimed or renewed meanwhile: its owner is back
            self._remove_staging(r)
            reaped.append(r["adapter_id"])
        return reaped

    def release(self, adapter_id: str | None = None, *, force: bool = False) -> str:
        """Clear a `training` reservation by hand (the one in progress if no id is given).
        One whose owner is gone is marked failed; a live owner's only with `force`, and
        its process, if on this host, is asked to stop (SIGTERM: it cancels cleanly)."""
        rows = self.store.rows("SELECT * FROM adapters WHERE status='training'" +
                               (" AND adapter_id=?" if adapter_id else " ORDER BY created_at LIMIT 1"),
                               (adapter_id,) if adapter_id else ())
        if not rows:
            if adapter_id:
                raise RegistryError(f"{adapter_id} is {self.get(adapter_id).status}, not training")
            raise RegistryError("no training is reserved on this store")
        r = rows[0]
        now = time.time()
        why = _gone(r, now, self.stale_after_s)
        if why is None:
            if not force:
                raise RegistryError(f"{r['adapter_id']} is held by a live process (pid {r['pid']} on "
                                    f"{r.get('owner_host') or 'this host'}); release it with --force")
            if r.get("owner_host") in (None, _host()) and _alive(r["pid"], r.get("owner_start")) \
                    and r["pid"] != os.getpid():
                try:
                    os.kill(r["pid"], signal.SIGTERM)
                except OSError:
                    pass
            why = "released by hand while its process was alive"
        with self.store.transaction() as db:
            if not self._fail(db, r, why, now):
                raise RegistryError(f"{r['adapter_id']} changed meanwhile; try again")
        self._remove_staging(r)
        return r["adapter_id"]

    @staticmethod
    def _fail(db, r: dict, why: str, now: float) -> bool:
        """Mark a reservation failed if it is still as `r` saw it (owner and heartbeat unchanged)."""
        cur = db.execute("UPDATE adapters SET status='failed', error=COALESCE(error, ?), finished_at=? "
                         "WHERE adapter_id=? AND status='training' AND pid IS ? AND heartbeat_at IS ?",
                         (why, now, r["adapter_id"], r["pid"], r.get("heartbeat_at")))
        return cur.rowcount > 0

    @staticmethod
    def _remove_staging(r: dict) -> None:
        if r.get("path"):
            p = Path(r["path"])
            for tmp in p.parent.glob(p.name + ".tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------ deploy pointer
    def promote(self, adapter_id: str, *, expect: str | None | bool = False, note: str = "") -> bool:
        """Point the task at this version. With `expect` (an adapter id or None for the
        base), only if the pointer still names it: a gate's verdict was measured against
        that version, and a manual promote or rollback in between wins."""
        v = self.get(adapter_id)
        if v.status not in ("passed", "rejected"):  # a person may overrule the gate, not promote half a file
            raise RegistryError(f"{adapter_id} is {v.status}; only a complete, evaluated version can be promoted")
        if v.serves_adapter and not v.gguf_path.is_file():
            raise RegistryError(f"{adapter_id}: {v.gguf_path} is missing")
        if v.serves_demonstrations and not v.demonstrations_path.is_file():
            raise RegistryError(f"{adapter_id}: {v.demonstrations_path} is missing")
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

    def rollback_target(self, task_key: str, base: str) -> str | None:
        """What `rollback` would serve the task with now (None: the base model)."""
        with self.store.transaction() as db:
            return _rollback_pair(db, task_key, base)[1]

    def rollback(self, task_key: str, base: str, *, note: str = "") -> str | None:
        """Serve the task with what served it before the current version was promoted
        (an earlier adapter, or the base model). Returns the version now serving."""
        with self.store.transaction() as db:
            current, target = _rollback_pair(db, task_key, base)
            db.execute("UPDATE deployments SET adapter_id=?, updated_at=? WHERE task_key=? AND base=?",
                       (target, time.time(), task_key, base))
            db.execute("INSERT INTO deploy_log (task_key, base, action, adapter_id, previous, created_at, note) "
                       "VALUES (?,?,?,?,?,?,?)", (task_key, base, "rollback", target, current, time.time(), note))
        return target


def _rollback_pair(db, task_key: str, base: str) -> tuple[str, str | None]:
    row = db.execute("SELECT adapter_id FROM deployments WHERE task_key=? AND base=?", (task_key, base)).fetchone()
    current = row[0] if row else None
    if current is None:
        raise RegistryError(f"{task_key}: the base model already serves it; nothing to roll back")
    prev = db.execute("SELECT previous FROM deploy_log WHERE task_key=? AND base=? AND action='promote' "
                      "AND adapter_id=? ORDER BY id DESC LIMIT 1", (task_key, base, current)).fetchone()
    return current, prev[0] if prev else None


def _fsync_tree(d: Path) -> None:
    for p in d.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def describe(v: AdapterVersion) -> dict[str, Any]:
    return {"adapter_id": v.adapter_id, "version": v.version, "status": v.status, "base": v.base,
            "created_at": v.created_at, "parent": v.parent, "score": v.score,
            "baseline_score": v.metrics.get("baseline_score"), "n_train": v.data.get("n_train"),
            "n_heldout": v.data.get("n_heldout"), "kind": v.kind,
            "serves": [k for k, on in (("adapter", v.serves_adapter), ("demonstrations", v.serves_demonstrations))
                       if on] if v.status in ("passed", "rejected") else None,
            "why": v.metrics.get("reason") or v.error, "error": v.error}
