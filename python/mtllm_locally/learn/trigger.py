"""The learning loop's trigger: decides when a task trains, and starts the training
process. Runs as one daemon thread in the serving program, woken by the runtime's
on-call hook (wiring.py subscribes it); works the same from the CLI (`train`)
without a running program.

    due?  >= policy.min_new_examples new examples since the task's last training,
          no training running on this store (any process), min_interval_s since the
          last one started
    then  reserve a version in the registry -> spawn `learn.worker` (low priority,
          its own session, thread budget) -> the worker trains, gates and promotes
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .. import models
from .dataset import task_examples
from ..state.files import private_dir, private_open
from ..state.policy import Policy, TaskPolicy
from ..state.registry import AdapterVersion, Registry, RegistryError
from ..state.store import Store
from ..state.task import task_dirname

log = logging.getLogger("mtllm_locally.learn")


@dataclass(frozen=True)
class TaskRef:
    task_key: str
    function: str | None
    model_path: str


def new_examples(store: Store, registry: Registry, task_key: str, policy: TaskPolicy) -> int:
    last = registry.versions(task_key)
    since = last[-1].created_at if last else 0.0
    # Checked after every call: a cheap count of new calls first (an upper bound on new
    # examples), the full dataset read only once it could reach the threshold.
    (calls,) = store.rows("SELECT COUNT(*) AS n FROM calls WHERE task_key=? AND created_at>?", (task_key, since))
    if calls["n"] < policy.min_new_examples:
        return calls["n"]
    return sum(e.created_at > since for e in task_examples(store, task_key, heldout_percent=policy.heldout_percent,
                                                          train_on=policy.train_on))


def due(store: Store, registry: Registry, ref: TaskRef, policy: TaskPolicy) -> tuple[bool, str]:
    if not policy.learn:
        return False, "learning is off for this task"
    n = new_examples(store, registry, ref.task_key, policy)
    if n < policy.min_new_examples:
        return False, f"at most {n} new examples (< {policy.min_new_examples})"
    running = registry.training()
    if running is not None:
        return False, f"{running.adapter_id} is training"
    wait = registry.last_started() + policy.min_interval_s - time.time()
    if wait > 0:
        return False, f"next training allowed in {wait:.0f} s"
    return True, f"{n} new examples"


def start_training(store: Store, ref: TaskRef, policy: TaskPolicy, *, wait: bool = False,
                   log_dir: Path | None = None) -> tuple[AdapterVersion, subprocess.Popen]:
    """Reserve the next version and start the worker process for it. Whatever fails
    before the worker holds the reservation releases it (marked failed)."""
    registry = Registry(store)
    base = models.fingerprint(ref.model_path)
    v = registry.reserve(ref.task_key, base, policy=policy, model_path=ref.model_path, function=ref.function)
    try:
        log_dir = private_dir(log_dir or store.path.parent / "logs")
        env = dict(os.environ)
        if policy.threads:
            env["OMP_NUM_THREADS"] = str(policy.threads)  # torch and llama.cpp's OpenMP pools
        cmd = [sys.executable, "-m", "mtllm_locally.learn.worker", "--store", str(store.path), "--adapter-id",
               v.adapter_id]
        with private_open(log_dir / f"train-{task_dirname(v.task_key)}-v{v.version}.log", "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        registry.claim(v.adapter_id, proc.pid)
    except BaseException as e:
        registry.finish(v.adapter_id, "failed", error=f"could not start the training process: {type(e).__name__}: {e}")
        raise
    log.info("training %s started (pid %d)", v.adapter_id, proc.pid)
    if wait:
        proc.wait()
    return v, proc


class Learner:
    """The trigger, in a daemon thread of the serving process."""

    def __init__(self, store: Store, policy: Policy, poll_s: float = 5.0):
        self.store = store
        self.policy = policy
        self.registry = Registry(store)
        self.poll_s = poll_s
        self._tasks: dict[str, TaskRef] = {}
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen] = []
        self._thread = threading.Thread(target=self._run, name="mtllm-learner", daemon=True)
        self._thread.start()

    def nudge(self, ref: TaskRef) -> None:
        with self._lock:
            self._tasks[ref.task_key] = ref
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """No more checks (the store is about to close). Trainings already started go on."""
        self._stopped.set()
        self._wake.set()

    def check_now(self) -> list[str]:
        """One pass over the known tasks; returns the versions it started."""
        started = []
        self._procs = [p for p in self._procs if p.poll() is None]  # reap finished workers
        with self._lock:
            refs = list(self._tasks.values())
        for ref in refs:
            policy = self.policy.for_task(ref.function)
            try:
                ok, why = due(self.store, self.registry, ref, policy)
                if ok:
                    v, proc = start_training(self.store, ref, policy)
                    self._procs.append(proc)
                    started.append(v.adapter_id)
                    break  # one at a time
            except RegistryError as e:  # another process won the race
                log.debug("not training %s: %s", ref.task_key, e)
            except Exception as e:  # the loop must never take the program down
                log.warning("learning loop: %s: %s", type(e).__name__, e)
        return started

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(self.poll_s)
            time.sleep(0.5)  # let byllm's verdict on the call land first
            self._wake.clear()
            if not self._stopped.is_set():
                self.check_now()
