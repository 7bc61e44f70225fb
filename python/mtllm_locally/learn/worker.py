"""One training job, run in its own low-priority process:

    examples from the store -> train (thread budget) -> publish the version
    -> gate against what serves the task now -> promote if it is better

    python -m mtllm_locally.learn.worker --store <calls.sqlite3> --adapter-id <task@vN>

The version was reserved in the registry by whoever started us (the loop or the
CLI); everything this process writes is either in a staging directory or committed
in one transaction, so killing it at any point leaves the registry consistent and
the last good version serving. SIGTERM cancels cleanly. While it works it renews its
reservation's heartbeat; if the reservation is taken from it (reclaimed as stale, or
released by hand) it stops. Its umask is 077: whatever a library writes for it
(checkpoints, adapters) is its owner's only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import MappingProxyType

from .. import demonstrations
from ..demonstrations import plain_user_content
from ..state.files import make_private, private_dir, private_open
from ..state.policy import TaskPolicy
from ..state.registry import HEARTBEAT_S, AdapterVersion, Registry, RegistryError
from ..state.store import Store
from .dataset import snapshot, split, task_examples
from . import target_gate
from .demonstrations import as_demonstrations, choose


IDLE_AFTER_S = 15.0   # no call recorded for this long: the program is idle or has exited
VARIANTS = ("adapter", "demonstrations", "adapter+demonstrations")  # the simplest first, among equals


class ThreadBudget:
    """How many threads the job may use now: the policy's budget while the program calls
    the model, every core once no call has been recorded for IDLE_AFTER_S (the program
    is idle, or has exited). Asked before each training step; reads the store at most
    every `check_every_s`."""

    def __init__(self, store: Store, busy: int, *, idle_after_s: float = IDLE_AFTER_S, check_every_s: float = 5.0):
        self.store = store
        self.all = os.cpu_count() or 1
        self.busy = min(busy or self.all, self.all)
        self.idle_after_s = idle_after_s
        self.check_every_s = check_every_s
        self._checked = -1e18
        self._now = self.busy
        self.asked = self.idle_answers = 0

    def __call__(self) -> int:
        if time.monotonic() - self._checked >= self.check_every_s:
            self._checked = time.monotonic()
            try:
                last = self.store.last_call_at()
            except Exception:  # a busy store: keep the last answer
                last = time.time()
            self._now = self.all if last is None or time.time() - last > self.idle_after_s else self.busy
        self.asked += 1
        self.idle_answers += self._now > self.busy
        return self._now


def loop_train_config(policy: TaskPolicy):
    """The trainer's defaults (which already raise epochs for small datasets), the task's overrides."""
    from .trainer import TrainConfig

    return TrainConfig(**{"threads": policy.threads, **policy.train})


SHAPE = ("rank", "alpha", "target_modules", "lora_layers", "use_rslora")  # what a warm start must share


def _previous_adapter(deployed: AdapterVersion | None, policy: TaskPolicy, cfg) -> Path | None:
    """The deployed version's PEFT adapter, to continue from (None: train from zero)."""
    if deployed is None or not deployed.serves_adapter or not policy.warm_start or not deployed.path:
        return None
    before = deployed.metrics.get("train_config") or {}
    now = asdict(cfg)
    if any(list(before.get(k, ())) != list(now[k]) if isinstance(now[k], tuple) else before.get(k) != now[k]
           for k in SHAPE):
        return None  # trained with another LoRA shape
    peft = Path(deployed.path) / "peft"
    return peft if (peft / "adapter_model.safetensors").is_file() else None


def _train(store: Store, registry: Registry, v: AdapterVersion, train_set, staging: Path, deployed, budget,
           cancel, progress: bool, log) -> dict:
    from .trainer import train

    policy = v.policy
    cfg = loop_train_config(policy)
    init = _previous_adapter(deployed, policy, cfg)
    if init is not None:
        try:
            from safetensors import safe_open

            with safe_open(str(init / "adapter_model.safetensors"), "pt"):
                pass
        except Exception as e:  # a damaged previous adapter must not fail every retraining
            log(f"{v.adapter_id}: cannot continue from {deployed.adapter_id} ({e}); training from zero")
            init = None
    if init is not None:
        cfg = replace(cfg, **{k: val for k, val in WARM_START.items() if k not in policy.train})
    log(f"{v.adapter_id}: training on {len(train_set)} examples, >= {cfg.min_steps} steps, "
        f"{budget.busy} thread(s) while the program runs, {budget.all} when it is idle"
        + (f", continuing from {deployed.adapter_id}" if init is not None else ""))
    t0 = time.perf_counter()
    # One checkpoint per task: a training of the same data killed or cancelled earlier
    # (a retried `mtllm-locally train`) resumes where it stopped.
    checkpoint_dir = private_dir(Path(v.path).parent / "checkpoint")
    try:
        res = train(v.model_path, [e.as_training() for e in train_set], cfg, staging, cancel=cancel,
                    progress=progress, name="adapter", checkpoint_dir=checkpoint_dir, init_from=init,
                    thread_budget=budget)
    finally:
        make_private(checkpoint_dir)  # a checkpoint kept for a retry, written under the caller's umask
    if res.resumed_from:
        log(f"{v.adapter_id}: resumed from a checkpoint at step {res.resumed_from}")
    os.replace(res.peft_dir, staging / "peft")
    return {"train_seconds": time.perf_counter() - t0, "steps": res.steps, "tokens": res.tokens,
            "tokens_per_second": res.tokens_per_second, "resumed_from": res.resumed_from,
            "first_loss": res.losses[0], "final_loss": res.losses[-1], "train_config": asdict(cfg),
            "warm_start": deployed.adapter_id if init is not None else None,
            "idle_steps": budget.idle_answers, "threads_busy": budget.busy, "threads_idle": budget.all}


# A retraining continues from the task's previous adapter: it starts near the answer,
# so it needs fewer passes (TrainConfig fields; the task's own `train` settings win).
WARM_START = MappingProxyType({"min_steps": 40, "epochs": 2})


def run_job(store: Store, adapter_id: str, *, progress: bool = False, log=print) -> AdapterVersion:
    from .. import Engine
    from .gate import answer_budget, evaluate, judge
    from .trainer import TrainingCancelled

    registry = Registry(store)
    if not registry.claim(adapter_id, os.getpid()):
        raise RegistryError(f"{adapter_id} is {registry.get(adapter_id).status}, not reserved for training")
    cancel = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: cancel.set())
    done = threading.Event()
    threading.Thread(target=_heartbeat, args=(registry, adapter_id, cancel, done), name="mtllm-heartbeat",
                     daemon=True).start()
    staging = None
    try:
        v = registry.get(adapter_id)
        policy = v.policy
        model_path = v.model_path
        examples = task_examples(store, v.task_key, heldout_percent=policy.heldout_percent,
                                 train_on=policy.train_on, until=v.created_at)
        train_set, heldout = split(examples)
        data = snapshot(examples)
        deployed = registry.deployed(v.task_key, v.base)
        budget = ThreadBudget(store, policy.threads)
        staging = registry.staging_dir(v)
        with private_open(staging / "data.jsonl", "w") as f:
            for e in examples:
                f.write(json.dumps({"invocation_id": e.invocation_id, "heldout": e.heldout, "label": e.label,
                                    **e.as_training()}) + "\n")
        chosen = choose(train_set, k=policy.demonstrations) if policy.demonstrations else []
        shown = as_demonstrations(chosen)
        if shown:
            demonstrations.save(staging / demonstrations.FILE, shown)
        metrics: dict = {"n_demonstrations": len(shown)}
        if v.kind == "training":
            metrics.update(_train(store, registry, v, train_set, staging, deployed, budget, cancel, progress, log))
        v = registry.publish(v, staging, data=data, metrics=metrics)
        staging = None
        if cancel.is_set():
            raise TrainingCancelled("cancelled after training")

        # The gate: what serves the task now vs each variant of the candidate, same engine,
        # same examples. Demonstrations alone were never trained on anything, so when the
        # baseline was not trained on the training split either, every labelled example not
        # shown as a demonstration is fair to judge them on (more evidence, early on).
        base_shown = demonstrations.load(deployed.demonstrations_path) \
            if deployed and deployed.serves_demonstrations else ()
        judged = heldout
        if v.kind == "demonstrations" and (deployed is None or not deployed.serves_adapter):
            # neither side may have seen the answer: not ours, not those the deployed version shows
            seen = {json.dumps(d.user) for d in shown + base_shown}
            judged = heldout + [e for e in train_set if json.dumps(plain_user_content(e.messages, e.tools)) not in seen]
        if v.kind == "demonstrations" and not shown:
            why = "no candidate: no training example of the plain call shape to show"
            registry.finish(adapter_id, "rejected", metrics={"reason": why, "serves": {}})
            log(f"{adapter_id}: not judged: {why}")
            return registry.get(adapter_id)
        if len(judged) < policy.min_heldout:
            why = f"only {len(judged)} examples to judge on (< {policy.min_heldout})"
            registry.finish(adapter_id, "rejected", metrics={"reason": why, "serves": {}})
            log(f"{adapter_id}: not judged: {why}")
            return registry.get(adapter_id)
        with Engine(model_path, n_threads=budget(), n_ctx=4096) as eng:
            base_adapters = [(eng.load_adapter(deployed.gguf_path), 1.0)] if deployed and deployed.serves_adapter \
                else []
            baseline = evaluate(eng, judged, base_adapters, base_shown)
            budgets = [answer_budget(eng, ex) for ex in judged]  # the target gate's, the same as here
            trained = [(eng.load_adapter(v.gguf_path), 1.0)] if v.kind == "training" else None
            results = {}
            if trained:
                results["adapter"] = evaluate(eng, judged, trained)
            if shown:
                results["demonstrations"] = evaluate(eng, judged, [], shown)
                if trained:
                    results["adapter+demonstrations"] = evaluate(eng, judged, trained, shown)
        if not results:
            why = "no candidate: no demonstrations of the plain call shape"
            registry.finish(adapter_id, "rejected", metrics={"reason": why, "serves": {}})
            return registry.get(adapter_id)
        best = max(results, key=lambda k: (results[k].score, -VARIANTS.index(k)))
        verdict = judge(results[best], baseline, margin=policy.margin, min_heldout=policy.min_heldout)
        metrics = {**verdict.metrics(), "baseline": deployed.adapter_id if deployed else None,
                   "baseline_fields": baseline.fields, "candidate_fields": results[best].fields,
                   "serves": {"adapter": "adapter" in best, "demonstrations": "demonstrations" in best},
                   "variant": best, "variants": {k: r.as_dict() for k, r in results.items()},
                   "judged_on": "held-out" if judged is heldout else "held-out + unshown training examples"}
        passed, promote = verdict.passed, verdict.passed and policy.auto_promote
        log(f"{adapter_id}: gate {'passed' if verdict.passed else 'rejected'} ({best}): {verdict.reason}")
        remote = None
        if promote and policy.remote.active:  # traffic may only move once the server judged it too
            remote = target_gate.push(registry, v, metrics["serves"], policy, judged, budgets, shown, results[best],
                                      baseline, log)
            metrics["remote"] = remote
            if remote["state"] == "rejected":
                passed = promote = False
                metrics["passed"], metrics["reason"] = False, f"target gate: {remote['reason']}"
            elif remote["state"] == "unavailable" and policy.remote.required:
                promote = False
        registry.finish(adapter_id, "passed" if passed else "rejected", metrics=metrics)
        if promote:
            if registry.promote(adapter_id, expect=deployed.adapter_id if deployed else None,
                                note=f"gate: {verdict.reason}"):
                log(f"{adapter_id}: promoted" + (f", served by {remote['target']} as {remote['name']}"
                                                 if remote and remote["state"] == "served" else ""))
            else:
                log(f"{adapter_id}: not promoted: the deployed version changed while it was judged")
            if remote and remote.get("target"):
                _retire_quietly(registry, policy, v.task_key, log)
        elif remote and remote["state"] != "rejected":
            log(f"{adapter_id}: passed, not promoted: the vLLM server could not take it ({remote['reason']}); "
                f"`mtllm-locally promote {adapter_id}` retries")
        return registry.get(adapter_id)
    except TrainingCancelled as e:
        registry.finish(adapter_id, "cancelled", error=str(e))
        raise
    except BaseException as e:
        registry.finish(adapter_id, "failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        done.set()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _retire_quietly(registry: Registry, policy, task_key: str, log) -> None:
    """The task's other names on the server drain and are unloaded (by reconcile, here or in
    the serving process): the promotion already happened, so a failure here only delays that."""
    from ..state.remote import Deployer

    try:
        Deployer(registry, policy.remote).retire_others(task_key)
    except Exception as e:
        log(f"{task_key}: old versions on the vLLM server not retired yet: {e}")


def _heartbeat(registry: Registry, adapter_id: str, cancel: threading.Event, done: threading.Event) -> None:
    """Renew the reservation while the job runs; stop the job if it was taken away."""
    while not done.wait(HEARTBEAT_S):
        try:
            if not registry.heartbeat(adapter_id):
                print(f"{adapter_id}: the reservation was released or reclaimed; stopping", flush=True)
                cancel.set()
                return
        except Exception as e:  # a busy store now and then is no reason to stop training
            print(f"{adapter_id}: heartbeat failed: {type(e).__name__}: {e}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mtllm_locally.learn.worker")
    ap.add_argument("--store", required=True)
    ap.add_argument("--adapter-id", required=True)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    os.umask(0o077)  # this process only writes the user's private data
    try:
        os.nice(10)  # serving first
    except OSError:
        pass
    from .trainer import TrainingCancelled

    store = Store(args.store)
    try:
        run_job(store, args.adapter_id, progress=args.progress, log=lambda m: print(m, flush=True))
    except TrainingCancelled:
        return 3
    except Exception as e:
        print(f"training failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
