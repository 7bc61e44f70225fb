"""The learning loop's trigger: decides when a task trains, and starts the training
process. Runs as one daemon thread in the serving program, woken by the runtime's
on-call hook (wiring.py subscribes it); works the same from the CLI (`train`)
without a running program.

    due?  demonstrations: early, from the first labelled calls (see `due`)
          training: >= policy.min_new_examples new training examples (retrain as the
          data doubles); no training running on this store (any process)
    then  reserve a version in the registry -> spawn `learn.worker` (low priority,
          its own session, thread budget) -> the worker trains (or picks demonstrations),
          gates and promotes
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
from .dataset import split, task_examples
from ..state.files import private_dir, private_open
from ..state.policy import Policy, TaskPolicy
from ..state.registry import AdapterVersion, Registry, RegistryError
from ..state.remote import Deployer
from ..state.store import Store
from ..state.task import task_dirname

log = logging.getLogger("mtllm_locally.learn")


@dataclass(frozen=True)
class TaskRef:
    task_key: str
    function: str | None
    model_path: str


@dataclass(frozen=True)
class Due:
    kind: str | None     # "training", "demonstrations", or None (nothing to do now)
    why: str             # said in `mtllm-locally status`
    labelled: int = 0    # labelled examples when it was decided (a demonstrations job records it)

    def __bool__(self) -> bool:  # `ok, why = due(...)` and `if due(...)` both read naturally
        return self.kind is not None

    def __iter__(self):
        return iter((self.kind is not None, self.why))


def _counts(store: Store, task_key: str, policy: TaskPolicy) -> tuple[list, list]:
    examples = task_examples(store, task_key, heldout_percent=policy.heldout_percent, train_on=policy.train_on)
    return split(examples)


def due(store: Store, registry: Registry, ref: TaskRef, policy: TaskPolicy) -> Due:
    """What the task needs next, and why (or why nothing).

    training         >= min_new_examples new training examples since the last training,
                     and, after a first training, at least as many new as it was trained
                     on (retrain as the data doubles, continuing from the deployed adapter)
    demonstrations   before any training: once there are enough labelled examples to show
                     `policy.demonstrations` and judge them on min_heldout others, and
                     again each time the labelled examples have doubled
    """
    if not policy.learn:
        return Due(None, "learning is off for this task")
    versions = registry.versions(ref.task_key)
    trainings = [v for v in versions if v.kind == "training"]
    demos = [v for v in versions if v.kind == "demonstrations"]
    since = trainings[-1].created_at if trainings else 0.0
    trained_on = trainings[-1].data.get("n_train", 0) if trainings else 0
    want = max(policy.min_new_examples, trained_on)
    first = policy.demonstrations + policy.min_heldout
    last = max(demos[-1].config.get("labelled", 0),
               demos[-1].data.get("n_train", 0) + demos[-1].data.get("n_heldout", 0)) if demos else 0
    show_at = max(first, 2 * last) if policy.demonstrations and not trainings else None
    # Cheap check first (every call runs it): numbers of calls bound the examples, so the
    # dataset is read only once one of the thresholds could be reached.
    (total,) = store.rows("SELECT COUNT(*) AS n FROM calls WHERE task_key=?", (ref.task_key,))
    (recent,) = store.rows("SELECT COUNT(*) AS n FROM calls WHERE task_key=? AND created_at>?", (ref.task_key, since))
    if recent["n"] < want and (show_at is None or total["n"] < show_at):
        return Due(None, f"{recent['n']} calls since the last training; a training needs {want} new training "
                         "examples" + (f", demonstrations {show_at} labelled calls" if show_at else ""))
    train, heldout = _counts(store, ref.task_key, policy)
    new = sum(e.created_at > since for e in train)
    running = registry.training()
    # A deployed adapter that no candidate could beat by the margin on the held-out inputs it was
    # judged on: wait until the held-out split has doubled (new inputs may show its errors).
    top = next((v for v in registry.serving().values() if v.task_key == ref.task_key and v.serves_adapter
                and (v.score or 0.0) + policy.margin > 1.0), None)
    if new >= want and top is not None and len(heldout) < 2 * top.metrics.get("n_heldout", 0):
        return Due(None, f"{new} new training examples, but {top.adapter_id} scores {top.score:.2f} on "
                         f"{top.metrics.get('n_heldout')} held-out inputs: no candidate could beat it by "
                         f"{policy.margin}; retrained once {2 * top.metrics.get('n_heldout', 0)} are held out "
                         f"({len(heldout)} now)")
    if new >= want:
        if running is not None:
            return Due(None, f"{new} new training examples; waiting for {running.adapter_id}")
        # trainings of any task share the CPU: min_interval_s apart, store-wide
        last_training = max((v.created_at for v in registry.versions() if v.kind == "training"), default=0.0)
        wait = last_training + policy.min_interval_s - time.time()
        if wait > 0:
            return Due(None, f"{new} new training examples; next training allowed in {wait:.0f} s")
        return Due("training", f"{new} new training examples (>= {want})")
    why = f"{new} new training examples (a training needs {want})"
    if show_at is None:
        return Due(None, why)
    labelled = len(train) + len(heldout)
    if labelled < show_at:
        return Due(None, why + f"; demonstrations are tried at {show_at} labelled examples ({labelled} now)")
    if running is not None:
        return Due(None, why + f"; demonstrations wait for {running.adapter_id}")
    return Due("demonstrations", f"{labelled} labelled examples: trying {policy.demonstrations} of them as "
                                 "demonstrations", labelled)


def start_training(store: Store, ref: TaskRef, policy: TaskPolicy, *, wait: bool = False,
                   log_dir: Path | None = None, kind: str = "training",
                   labelled: int = 0) -> tuple[AdapterVersion, subprocess.Popen]:
    """Reserve the next version and start the worker process for it (`kind`: "training",
    or "demonstrations": choose and judge demonstrations only, no LoRA). Whatever fails
    before the worker holds the reservation releases it (marked failed)."""
    if kind not in ("training", "demonstrations"):
        raise ValueError(kind)
    registry = Registry(store)
    base = models.fingerprint(ref.model_path)
    v = registry.reserve(ref.task_key, base, policy=policy, model_path=ref.model_path, function=ref.function,
                         config={"kind": kind, "labelled": labelled})
    try:
        log_dir = private_dir(log_dir or store.path.parent / "logs")
        env = dict(os.environ)
        # Training reads the served GGUF and nothing else: Hugging Face libraries must not look
        # anything up online in the worker (a fetch would fail here and leak which model we use).
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
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


def _urgency(registry: Registry, ref: TaskRef, d: Due) -> tuple:
    trained = [v for v in registry.versions(ref.task_key) if v.kind == "training" and v.status in ("passed",
                                                                                                    "rejected")]
    serving = [v.score or 0.0 for v in registry.serving().values() if v.task_key == ref.task_key]
    return (bool(trained), d.kind != "demonstrations", max(serving, default=0.0))


RECONCILE_S = 60.0  # how often the serving process checks its vLLM servers against the registry


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
        self.reasons: dict[str, str] = {}  # task -> why it did or did not train at the last check
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
        ready = []
        for ref in refs:
            policy = self.policy.for_task(ref.function)
            try:
                d = due(self.store, self.registry, ref, policy)
                self.reasons[ref.task_key] = d.why
                if d:
                    ready.append((_urgency(self.registry, ref, d), ref, policy, d))
            except Exception as e:  # the loop must never take the program down
                log.warning("learning loop: %s: %s", type(e).__name__, e)
        # One job at a time, the most useful first: a task nothing trained serves yet before a
        # retraining, and among retrainings the task served worst.
        for _, ref, policy, d in sorted(ready, key=lambda r: r[0])[:1]:
            try:
                v, proc = start_training(self.store, ref, policy, kind=d.kind, labelled=d.labelled)
                self._procs.append(proc)
                started.append(v.adapter_id)
            except RegistryError as e:  # another process won the race
                log.debug("not training %s: %s", ref.task_key, e)
            except Exception as e:
                log.warning("learning loop: %s: %s", type(e).__name__, e)
        return started

    def reconcile_servers(self) -> dict[str, dict]:
        """The vLLM servers the known tasks name: unload drained names, reload forgotten ones
        (state/remote.py). Only servers configured for a task are contacted."""
        with self._lock:
            refs = list(self._tasks.values())
        servers: dict[str, tuple] = {}  # base_url -> (settings, the tasks it serves)
        for ref in refs:
            try:
                s = self.policy.for_task(ref.function).remote
            except Exception as e:  # a bad jac.toml: said where the call path reads it; never this thread's end
                log.debug("vLLM settings for %s: %s", ref.function, e)
                continue
            if s.active:
                servers.setdefault(s.base_url, (s, set()))[1].add(ref.task_key)
        done = {}
        for url, (s, tasks) in servers.items():
            try:
                done[url] = Deployer(self.registry, s).reconcile(tasks=tasks)
            except Exception as e:  # a server down now is retried at the next pass
                log.info("vLLM at %s not reconciled: %s: %s", url, type(e).__name__, e)
        return done

    def _run(self) -> None:
        last_reconcile = 0.0
        while not self._stopped.is_set():
            self._wake.wait(self.poll_s)
            time.sleep(0.5)  # let byllm's verdict on the call land first
            self._wake.clear()
            if not self._stopped.is_set():
                self.check_now()
            if not self._stopped.is_set() and time.monotonic() - last_reconcile >= RECONCILE_S:
                last_reconcile = time.monotonic()
                try:
                    self.reconcile_servers()
                except Exception as e:  # the loop must never take the program down
                    log.warning("vLLM reconcile: %s: %s", type(e).__name__, e)
