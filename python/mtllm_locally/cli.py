"""`mtllm-locally` / `python -m mtllm_locally`: the model, and the learning loop.

    info | chat MESSAGE                       the model
    status | calls | feedback                 what the program did (the store)
    train | eval | promote | rollback         the learning loop, by hand
    release [ADAPTER_ID] [--force]            clear a stuck training reservation
    export | plot                             adapters out; held-out accuracy per version
    export-hf [MODEL] OUT                     the served model as a Hugging Face directory (for vLLM)
    vllm status|sync                          the vLLM servers promotions are pushed to
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path


def _store(args):
    from .state.store import Store

    return Store(args.store)


def _resolve_task(store, name: str) -> dict:
    """A task by its key, or by its Jac function name (the most recently called one)."""
    tasks = store.tasks()
    exact = [t for t in tasks if t["task_key"] == name]
    if exact:
        return exact[0]
    by_fn = [t for t in tasks if t["function"] == name or (t["function"] or "").rsplit(".", 1)[-1] == name]
    if not by_fn:
        raise SystemExit(f"error: no task {name!r}; known: {', '.join(t['task_key'] for t in tasks) or 'none'}")
    if len(by_fn) > 1:
        print(f"note: {name} has {len(by_fn)} signatures; using the most recent, {by_fn[0]['task_key']}",
              file=sys.stderr)
    return by_fn[0]


def _model_path(store, task: dict, model: str | None) -> str:
    from . import models

    if model is None:
        rows = store.rows("SELECT model FROM calls WHERE task_key=? AND model LIKE 'mtllm_locally/%' "
                          "ORDER BY created_at DESC LIMIT 1", (task["task_key"],))
        model = rows[0]["model"].split("/", 1)[1] if rows else None
    return str(models.resolve(model))


def _print(obj, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
        return
    for row in obj if isinstance(obj, list) else [obj]:
        print("  ".join(f"{k}={v}" for k, v in row.items()))


def cmd_status(args) -> int:
    from .learn.dataset import split, task_examples
    from .learn.trigger import TaskRef, due
    from .state.policy import Policy
    from .state.registry import Registry

    def stage(v) -> str:
        parts = [p for p, on in ((f"adapter {v.adapter_id}", v.serves_adapter),
                                 (f"demonstrations of {v.adapter_id}", v.serves_demonstrations)) if on]
        return " + ".join(parts) + f" (held-out {v.score:.2f})" if v.score is not None else " + ".join(parts)

    store = _store(args)
    reg = Registry(store)
    training = reg.training()
    policies = Policy()
    out = []
    for t in store.tasks():
        policy = policies.for_task(t["function"])
        train, held = split(task_examples(store, t["task_key"], heldout_percent=policy.heldout_percent,
                                          train_on=policy.train_on))
        versions = reg.versions(t["task_key"])
        deployed = {d["base"]: d["adapter_id"] for d in reg.deployments() if d["task_key"] == t["task_key"]}
        last_eval = next((v for v in reversed(versions) if v.status in ("passed", "rejected")), None)
        serving = [reg.get(a) for a in deployed.values() if a]
        out.append({"task": t["task_key"], "function": t["function"], "calls": t["calls"],
                    "accepted": t["accepted"] or 0, "teacher_answers": t["teacher"] or 0,
                    "with_feedback": t["with_feedback"] or 0, "train_examples": len(train),
                    "heldout_examples": len(held), "versions": len(versions),
                    "deployed": deployed or "base",
                    "stage": stage(serving[-1]) if serving else "base model",
                    "last_eval": None if last_eval is None else
                    f"{last_eval.adapter_id} ({last_eval.kind}) {last_eval.status}: "
                    + (last_eval.metrics.get("reason") or ""),
                    "fields": None if last_eval is None else last_eval.metrics.get("candidate_fields"),
                    "next": due(store, reg, TaskRef(t["task_key"], t["function"], ""), policy).why,
                    "training": training.adapter_id if training and training.task_key == t["task_key"] else None})
    _print(out, args.json)
    if not out and not args.json:
        print(f"no calls captured in {store.path} yet")
    return 0


def cmd_calls(args) -> int:
    store = _store(args)
    task = _resolve_task(store, args.task)["task_key"] if args.task else None
    rows = store.calls(task, limit=args.limit)
    keep = ("invocation_id", "function", "created_at", "source", "adapter", "accepted", "output_text", "latency_ms")
    _print([{k: r.get(k) for k in keep} for r in rows[-args.limit:]], args.json)
    return 0


def cmd_feedback(args) -> int:
    store = _store(args)
    corrected = None
    if args.output is not None:
        try:
            corrected = json.loads(args.output)
        except json.JSONDecodeError:
            corrected = args.output
    correct = True if args.correct else False if args.wrong else None
    store.add_feedback(args.invocation_id, correct=correct, corrected_output=corrected, note=args.note)
    print(f"feedback recorded for {args.invocation_id}")
    return 0


def cmd_train(args) -> int:
    from .learn.trigger import TaskRef, start_training
    from .state.policy import Policy

    store = _store(args)
    task = _resolve_task(store, args.task)
    ref = TaskRef(task["task_key"], task["function"], _model_path(store, task, args.model))
    v, proc = start_training(store, ref, Policy().for_task(task["function"]))
    print(f"training {v.adapter_id} (pid {proc.pid}); log in {store.path.parent / 'logs'}")
    if args.wait:
        proc.wait()
        from .state.registry import Registry, describe

        _print(describe(Registry(store).get(v.adapter_id)), args.json)
        return 0 if proc.returncode == 0 else 1
    return 0


def cmd_eval(args) -> int:
    from . import Engine, models
    from .learn.dataset import split, task_examples
    from .learn.gate import evaluate
    from .state.policy import Policy
    from .state.registry import Registry

    store = _store(args)
    task = _resolve_task(store, args.task)
    policy = Policy().for_task(task["function"])
    path = _model_path(store, task, args.model)
    _, held = split(task_examples(store, task["task_key"], heldout_percent=policy.heldout_percent,
                                  train_on=policy.train_on))
    if not held:
        print("error: no held-out examples for this task yet", file=sys.stderr)
        return 2
    reg = Registry(store)
    base = models.fingerprint(path)
    versions = [v for v in reg.versions(task["task_key"]) if v.base == base and v.gguf_path.is_file()
                and (args.version is None or v.version == args.version)]
    out = []
    with Engine(path, n_ctx=4096) as eng:
        out.append({"version": "base", **evaluate(eng, held).as_dict()})
        for v in versions:
            out.append({"version": v.adapter_id, "status": v.status,
                        **evaluate(eng, held, [(eng.load_adapter(v.gguf_path), 1.0)]).as_dict()})
    _print(out, args.json)
    return 0


def _deployer(registry, function: str | None):
    """The task's vLLM deployer, or None when its policy names no server."""
    from .state.policy import Policy
    from .state.remote import Deployer

    settings = Policy().for_task(function).remote
    return Deployer(registry, settings) if settings.active else None


def cmd_promote(args) -> int:
    from .state.registry import Registry

    reg = Registry(_store(args))
    v = reg.get(args.adapter_id)
    deployer = _deployer(reg, v.config.get("function"))
    if deployer is not None:  # loaded and listed before traffic moves; a person overrules the target gate
        name = deployer.load(v)
        print(f"{args.adapter_id} loaded on {deployer.key} as {name}")
    if not reg.promote(args.adapter_id, note=f"manual promote at {time.ctime()}"):
        return 1
    if deployer is not None:
        deployer.retire_others(v.task_key)
    print(f"{args.adapter_id} now serves its task")
    return 0


def cmd_rollback(args) -> int:
    from . import models
    from .state.registry import Registry

    store = _store(args)
    task = _resolve_task(store, args.task)
    base = models.fingerprint(_model_path(store, task, args.model))
    reg = Registry(store)
    deployer = _deployer(reg, task["function"])
    note = f"manual rollback at {time.ctime()}"
    now = (deployer.rollback(task["task_key"], base, note=note) if deployer is not None
           else reg.rollback(task["task_key"], base, note=note))
    print(f"{task['task_key']} is now served by {now or 'the base model'}")
    return 0


def cmd_vllm(args) -> int:
    """The vLLM servers the store's tasks are configured for: what each holds (status), or
    make it hold what the registry says (sync: unload drained names, reload lost ones)."""
    from .state.registry import Registry

    store = _store(args)
    reg = Registry(store)
    deployers, tasks = {}, {}
    for t in store.tasks() + [{"function": None, "task_key": None}]:
        d = _deployer(reg, t["function"])
        if d is not None:
            deployers.setdefault(d.key, d)
            tasks.setdefault(d.key, set()).add(t["task_key"])
    if not deployers:
        print("error: no vLLM server configured (jac.toml [plugins.mtllm_locally.vllm] base_url, or "
              "MTLLM_LOCALLY_VLLM_URL)", file=sys.stderr)
        return 2
    out = []
    for key, d in deployers.items():
        entry = {"target": key, "adapters": [{k: r[k] for k in ("name", "adapter_id", "state", "retired_at", "error")}
                                             for r in d.rows()]}
        try:
            if args.action == "sync":
                entry["sync"] = d.reconcile(drain_s=0.0 if args.now else None, tasks=tasks[key])
            entry["served"] = d.target.served_models()
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {e}"
        out.append(entry)
    _print(out, args.json)
    return 0 if all("error" not in e for e in out) else 1


def cmd_release(args) -> int:
    from .state.registry import Registry

    adapter_id = Registry(_store(args)).release(args.adapter_id, force=args.force)
    print(f"{adapter_id} released (marked failed); trainings may start again")
    return 0


def cmd_export(args) -> int:
    import shutil

    from .state.registry import Registry
    from .state.files import make_private

    v = Registry(_store(args)).get(args.adapter_id)
    src = v.gguf_path if args.format == "gguf" else Path(v.path) / "peft"
    if not src.exists():
        print(f"error: {v.adapter_id} has no {args.format} adapter ({v.status})", file=sys.stderr)
        return 2
    dst = Path(args.out)
    # What we copy out is as private as the store it came from; a directory the user named is theirs.
    if src.is_dir():
        made = not dst.exists()
        shutil.copytree(src, dst, dirs_exist_ok=True)
        shutil.copy(Path(v.path) / "manifest.json", dst / "mtllm_manifest.json")
        copied = [dst] if made else [dst / f.name for f in src.iterdir()] + [dst / "mtllm_manifest.json"]
        for path in copied:
            make_private(path)
    else:
        shutil.copy(src, dst)
        make_private(dst / src.name if dst.is_dir() else dst)
    print(f"{args.format} adapter {v.adapter_id} -> {dst}")
    return 0


def cmd_export_hf(args) -> int:
    import torch

    from . import models
    from .learn.hf_model import write_hf_model

    out = write_hf_model(models.resolve(args.gguf or args.model), args.out, dtype=getattr(torch, args.dtype))
    print(f"Hugging Face model -> {out}")
    return 0


def cmd_plot(args) -> int:
    from .learn.plot import plot_versions
    from .state.registry import Registry
    from .state.files import make_private

    out = plot_versions(Registry(_store(args)), args.out)
    make_private(out)  # task names and scores of the user's program
    print(f"wrote {out}")
    return 0


def cmd_model(args) -> int:
    from . import Engine, MtllmError

    try:
        with Engine(args.model) as eng:
            if args.cmd == "info":
                info = asdict(eng.info)
                info["n_ctx"] = eng.n_ctx
                print(json.dumps(info, indent=2))
            else:
                msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [
                    {"role": "user", "content": args.message}]
                for chunk in eng.stream(messages=msgs, max_tokens=args.max_tokens, temperature=args.temperature):
                    print(chunk.text, end="", flush=True)
                print()
    except MtllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mtllm-locally", description="Local LLM runtime for Jac's by llm()")
    ap.add_argument("--model", default=None, help="GGUF path, or 'default' (embedded SmolLM2-135M)")
    ap.add_argument("--store", default=None, help="call store (default ./.mtllm_locally/calls.sqlite3)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="model metadata as JSON").set_defaults(fn=cmd_model)
    g = sub.add_parser("chat", help="one chat turn, streamed")
    g.add_argument("message")
    g.add_argument("--system", default=None)
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.set_defaults(fn=cmd_model)
    sub.add_parser("status", help="per task: calls, examples, deployed version, last eval").set_defaults(fn=cmd_status)
    g = sub.add_parser("calls", help="captured calls")
    g.add_argument("--task", default=None, help="task key or Jac function name")
    g.add_argument("--limit", type=int, default=20)
    g.set_defaults(fn=cmd_calls)
    g = sub.add_parser("feedback", help="mark a call right or wrong, or correct its output")
    g.add_argument("invocation_id")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--correct", action="store_true")
    x.add_argument("--wrong", action="store_true")
    g.add_argument("--output", default=None, help="the corrected output (JSON or text)")
    g.add_argument("--note", default=None)
    g.set_defaults(fn=cmd_feedback)
    g = sub.add_parser("train", help="train a task now (gate and promote as the loop would)")
    g.add_argument("task")
    g.add_argument("--wait", action="store_true", help="wait and print the verdict")
    g.set_defaults(fn=cmd_train)
    g = sub.add_parser("eval", help="held-out score of the base and each version of a task")
    g.add_argument("task")
    g.add_argument("--version", type=int, default=None)
    g.set_defaults(fn=cmd_eval)
    g = sub.add_parser("promote", help="serve a task with this version (overrules the gate)")
    g.add_argument("adapter_id")
    g.set_defaults(fn=cmd_promote)
    g = sub.add_parser("rollback", help="serve a task with what served it before")
    g.add_argument("task")
    g.set_defaults(fn=cmd_rollback)
    g = sub.add_parser("vllm", help="the vLLM servers the tasks are pushed to: status, or sync them")
    g.add_argument("action", choices=("status", "sync"))
    g.add_argument("--now", action="store_true", help="sync: unload retired versions without waiting for drain_s")
    g.set_defaults(fn=cmd_vllm)
    g = sub.add_parser("release", help="clear a training reservation whose process died or hangs")
    g.add_argument("adapter_id", nargs="?", default=None, help="default: the training reserved now")
    g.add_argument("--force", action="store_true", help="also one whose process is alive (it is asked to stop)")
    g.set_defaults(fn=cmd_release)
    g = sub.add_parser("export", help="copy a version out as a PEFT or GGUF adapter")
    g.add_argument("adapter_id")
    g.add_argument("--format", choices=("peft", "gguf"), default="peft")
    g.add_argument("--out", required=True)
    g.set_defaults(fn=cmd_export)
    g = sub.add_parser("export-hf", help="the served model as a Hugging Face model directory (no download)")
    g.add_argument("gguf", nargs="?", default=None, metavar="MODEL", help="GGUF path (default: --model, or the "
                   "embedded default as served)")
    g.add_argument("out")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="float32 (default): the base the adapters were trained on, exactly")
    g.set_defaults(fn=cmd_export_hf)
    g = sub.add_parser("plot", help="held-out accuracy per adapter version per task (PNG)")
    g.add_argument("--out", default="mtllm_locally_versions.png")
    g.set_defaults(fn=cmd_plot)
    args = ap.parse_args(argv)
    from .errors import MtllmError

    try:
        return args.fn(args)
    except (MtllmError, KeyError, ValueError) as e:  # bad input: one line, exit 2, never a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
