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

from ..state.files import make_private, private_dir, private_open
from ..state.policy import TaskPolicy
from ..state.registry import HEARTBEAT_S, AdapterVersion, Registry, RegistryError
from ..state.store import Store
from .dataset import snapshot, split, task_examples


def loop_train_config(policy: TaskPolicy):
    """The trainer's defaults (which already raise epochs for small datasets), the task's overrides."""
    from .trainer import TrainConfig

    return TrainConfig(**{"threads": policy.threads, **policy.train})


def run_job(store: Store, adapter_id: str, *, progress: bool = False, log=print) -> AdapterVersion:
    from .. import Engine
    from .gate import evaluate, judge
    from .trainer import TrainingCancelled, train

    registry = Registry(store)
    if not registry.claim(adapter_id, os.getpid()):
        raise RegistryError(f"{adapter_id} is {registry.get(adapter_id).status}, not reserved for training")
    cancel = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: cancel.set())
    done = threading.Event()
    threading.Thread(target=_heartbeat, args=(registry, adapter_id, cancel, done), name="mtllm-heartbeat",
                     daemon=True).start()
    staging = checkpoint_dir = None
    try:
        v = registry.get(adapter_id)
        policy = v.policy
        model_path = v.model_path
        examples = task_examples(store, v.task_key, heldout_percent=policy.heldout_percent,
                                 train_on=policy.train_on, until=v.created_at)
        train_set, heldout = split(examples)
        data = snapshot(examples)
        cfg = loop_train_config(policy)
        log(f"{adapter_id}: training on {len(train_set)} examples ({len(heldout)} held out), "
            f">= {cfg.min_steps} steps, {policy.threads or 'all'} thread(s)")
        staging = registry.staging_dir(v)
        with private_open(staging / "data.jsonl", "w") as f:
            for e in examples:
                f.write(json.dumps({"invocation_id": e.invocation_id, "heldout": e.heldout, "label": e.label,
                                    **e.as_training()}) + "\n")
        t0 = time.perf_counter()
        # One checkpoint per task: a training of the same data killed or cancelled earlier
        # (a retried `mtllm-locally train`) resumes where it stopped.
        checkpoint_dir = private_dir(Path(v.path).parent / "checkpoint")
        res = train(model_path, [e.as_training() for e in train_set], cfg, staging, cancel=cancel,
                    progress=progress, name="adapter", checkpoint_dir=checkpoint_dir)
        if res.resumed_from:
            log(f"{adapter_id}: resumed from a checkpoint at step {res.resumed_from}")
        os.replace(res.peft_dir, staging / "peft")
        train_metrics = {"train_seconds": time.perf_counter() - t0, "steps": res.steps, "tokens": res.tokens,
                         "tokens_per_second": res.tokens_per_second, "resumed_from": res.resumed_from,
                         "first_loss": res.losses[0],
                         "final_loss": res.losses[-1], "train_config": asdict(cfg)}
        v = registry.publish(v, staging, data=data, metrics=train_metrics)
        staging = None
        if cancel.is_set():
            raise TrainingCancelled("cancelled after training")

        # The gate: what serves the task now vs the candidate, same engine, same examples.
        deployed = registry.deployed(v.task_key, v.base)
        if not heldout:
            registry.finish(adapter_id, "rejected", metrics={"reason": "no held-out examples yet"})
            return registry.get(adapter_id)
        with Engine(model_path, n_threads=policy.threads or 0, n_ctx=4096) as eng:
            base_adapters = [(eng.load_adapter(deployed.gguf_path), 1.0)] if deployed else []
            baseline = evaluate(eng, heldout, base_adapters)
            candidate = evaluate(eng, heldout, [(eng.load_adapter(v.gguf_path), 1.0)])
        verdict = judge(candidate, baseline, margin=policy.margin, min_heldout=policy.min_heldout)
        metrics = {**verdict.metrics(), "baseline": deployed.adapter_id if deployed else None}
        registry.finish(adapter_id, "passed" if verdict.passed else "rejected", metrics=metrics)
        log(f"{adapter_id}: gate {'passed' if verdict.passed else 'rejected'}: {verdict.reason}")
        if verdict.passed and policy.auto_promote:
            if registry.promote(adapter_id, expect=deployed.adapter_id if deployed else None,
                                note=f"gate: {verdict.reason}"):
                log(f"{adapter_id}: promoted")
            else:
                log(f"{adapter_id}: not promoted: the deployed version changed while it was judged")
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
        if checkpoint_dir is not None:
            make_private(checkpoint_dir)  # a checkpoint kept for a retry, written under the caller's umask


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
