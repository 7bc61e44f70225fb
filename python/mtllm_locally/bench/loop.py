"""Loop bench, the main demo: a Jac program with two typed functions -- `route(ticket)
-> Team` (an enum label) and `read_invoice(text) -> Invoice` (an object: a string
copied from the input, a number, a date normalised to ISO) -- runs on the embedded
model and gets better at both by itself while it runs. Its jac.toml names a teacher
for both (an oracle LiteLLM provider standing in for a big model); everything else is
the default loop: capture -> demonstrations -> background training -> gate ->
promotion -> hot deploy.

    [1/4] the live run: the program at its pace until each task has a trained adapter
          serving (or a deadline); the harness only watches the store
    [2/4] accuracy through the engine on inputs the program never saw: the base model
          and every version the gate judged, each as it would be served
    [3/4] the learning curve: the same loop code (trigger, worker, gate) replayed on the
          first n labelled calls of each task, n = 0, 20, 50, 100, 200 (captured by the
          same program with learning off), and what the gate then serves, scored
    [4/4] the figures, and a plot

Ratios per task: accuracy_after_20 / base, accuracy_after_100, trigger_to_promotion_s,
calls_until_first_promotion, and whether any promotion ever served a worse version.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import Engine, demonstrations, models
from ..learn.dataset import Example, completion_for
from ..learn.gate import evaluate
from ..learn.trigger import TaskRef, due
from ..learn.worker import run_job
from ..state.policy import TaskPolicy
from ..state.registry import AdapterVersion, Registry
from ..state.store import Store
from .oracle import PRODUCTS, invoices
from .train import dataset

TASKS = ("route", "read_invoice")
GOALS = {"accuracy_after_20": ">= 1.5 x base (each task)",
         "accuracy_after_100": ">= 0.95 route, >= 0.80 read_invoice (exact match)",
         "trigger_to_promotion_s": "<= 300 (2 cores)", "never_served_worse": "true"}
CURVE = (0, 20, 50, 100, 200)
PROGRAM = Path(__file__).with_name("loop_program.jac")
JAC_TOML = """\
[project]
name = "back-office"

# The learning loop: only the teachers are named; everything else is the default.
[plugins.mtllm_locally.tasks.route]
teacher = "oracle/route"

[plugins.mtllm_locally.tasks.read_invoice]
teacher = "oracle/read_invoice"
"""


def _work(n: int, seed: int) -> list[dict]:
    """The program's stream: tickets and invoices, alternating."""
    tickets = [t for t, _ in dataset(n, seed=seed, products=PRODUCTS)]
    bills = [t for t, _ in invoices(n, seed=seed)]
    return [x for pair in zip(({"function": "route", "text": t} for t in tickets),
                              ({"function": "read_invoice", "text": b} for b in bills)) for x in pair]


def _jac_run(work_dir: Path, items: list[dict], env_extra: dict, out_file: Path, stop: Path):
    (work_dir / "work.json").write_text(json.dumps(items))
    env = dict(os.environ, BENCH_WORK=str(work_dir / "work.json"), BENCH_OUT=str(out_file), BENCH_STOP=str(stop),
               **env_extra)
    env.pop("MTLLM_LOCALLY_STORE", None)
    return subprocess.Popen([str(Path(sys.executable).with_name("jac")), "run", PROGRAM.name], cwd=work_dir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _setup(work_dir: Path) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROGRAM, work_dir / PROGRAM.name)
    (work_dir / "jac.toml").write_text(JAC_TOML)


def _tasks(store: Store) -> dict[str, str]:
    return {t["function"]: t["task_key"] for t in store.tasks()}


def _test_examples(store: Store, task_key: str, field: str, cases: list[tuple[str, object]]) -> list[Example]:
    """Unseen inputs in exactly the prompt byllm builds: a captured prompt of the task
    with its input text swapped."""
    row = store.rows("SELECT t.messages_json, t.response_format_json, c.inputs_json FROM turns t JOIN calls c "
                     "ON c.invocation_id=t.invocation_id WHERE c.task_key=? AND c.inputs_json IS NOT NULL "
                     "LIMIT 1", (task_key,))[0]
    template, rf = row["messages_json"], json.loads(row["response_format_json"])
    seen = json.dumps(json.loads(row["inputs_json"])[field])[1:-1]  # as it sits inside the JSON text
    return [Example(f"test-{i}", str(i), json.loads(template.replace(seen, json.dumps(text)[1:-1])), None, rf,
                    completion_for(answer, rf), "teacher", 0.0, True) for i, (text, answer) in enumerate(cases)]


def served_accuracy(eng: Engine, v: AdapterVersion | None, examples: list[Example]) -> float:
    """Exact-match accuracy of a version as the router serves it (None: the base model)."""
    return evaluate(eng, examples, *_served_args(eng, v)).exact


def _watch(store: Store, reg: Registry, out_file: Path, proc, stop: Path, deadline: float, after: int, log) -> None:
    """Log what the loop does; stop once every task has a trained version serving (+ `after` calls)."""
    seen: dict[str, str] = {}
    done_at = None
    while proc.poll() is None and time.time() < deadline:
        time.sleep(2)
        n = sum(1 for _ in open(out_file)) if out_file.exists() else 0
        for v in reg.versions():
            if seen.get(v.adapter_id) != v.status:
                seen[v.adapter_id] = v.status
                extra = ""
                if v.status in ("passed", "rejected"):
                    extra = (f" ({v.metrics.get('variant', '-')}): {v.metrics.get('reason', '')}"
                             + (f"; trained in {v.metrics['train_seconds']:.0f} s" if "train_seconds" in v.metrics
                                else ""))
                log(f"      call {n:4d}: {v.adapter_id} [{v.kind}] {v.status}{extra}")
        served = {t: reg.get(a) for t, a in ((d["task_key"], d["adapter_id"]) for d in reg.deployments()) if a}
        trained = sum(1 for v in served.values() if v.kind == "training")
        if done_at is None and trained >= len(TASKS):
            done_at = n
            log(f"      call {n:4d}: every task is served by a trained version")
        if done_at is not None and n >= done_at + after:
            break
    stop.touch()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()


def _replay(source: Path, task_key: str, n: int, into: Path) -> Store:
    """A store holding the first n labelled calls of a task, as they were captured."""
    Store(into).close()  # the schema
    db = sqlite3.connect(into)
    db.execute("ATTACH DATABASE ? AS src", (str(source),))
    ids = [r[0] for r in db.execute(
        "SELECT c.invocation_id FROM src.calls c WHERE c.task_key=? AND c.accepted=1 AND EXISTS (SELECT 1 FROM "
        "src.turns t WHERE t.invocation_id=c.invocation_id AND t.source LIKE 'teacher:%') ORDER BY c.created_at "
        "LIMIT ?", (task_key, n))]
    marks = ",".join("?" * len(ids))
    for table in ("calls", "turns"):
        db.execute(f"INSERT INTO main.{table} SELECT * FROM src.{table} WHERE invocation_id IN ({marks})", ids)
    db.commit()
    db.execute("DETACH DATABASE src")
    db.close()
    return Store(into)


def learning_curve(capture: Path, function: str, task_key: str, tests: list[Example], eng: Engine, policy: TaskPolicy,
                   ns=CURVE, log=print) -> list[dict]:
    """For each n: the loop's own stages on the first n labelled calls, until nothing is due;
    then the test accuracy of what the gate serves."""
    model_path = str(models.resolve(None))
    base = models.fingerprint(model_path)
    points = []
    for n in ns:
        work = Path(tempfile.mkdtemp(prefix=f"mtllm-curve-{function}-{n}-"))
        store = _replay(capture, task_key, n, work / "calls.sqlite3")
        reg = Registry(store)
        ref = TaskRef(task_key, function, model_path)
        steps, t0 = [], time.perf_counter()
        while (d := due(store, reg, ref, policy)) and len(steps) < 4:
            v = reg.reserve(task_key, base, policy=policy, model_path=model_path, function=function,
                            config={"kind": d.kind, "labelled": d.labelled})
            v = run_job(store, v.adapter_id, log=lambda m: None)
            steps.append(f"{v.kind} {v.status} ({v.metrics.get('variant', '-')})")
        served = reg.deployed(task_key, base)
        acc = served_accuracy(eng, served, tests)
        points.append({"labelled": n, "accuracy": acc, "served": _what(served), "stages": steps,
                       "seconds": time.perf_counter() - t0})
        log(f"      {function} after {n:3d} labelled calls: {acc:.3f} served by {_what(served)} "
            f"[{'; '.join(steps) or 'nothing due'}] {time.perf_counter() - t0:.0f} s")
        store.close()
        shutil.rmtree(work, ignore_errors=True)
    return points


def _what(v: AdapterVersion | None) -> str:
    if v is None:
        return "base model"
    return "+".join(k for k, on in (("adapter", v.serves_adapter), ("demonstrations", v.serves_demonstrations)) if on)


def run(quick: bool = False, log=print) -> dict:
    root = Path(tempfile.mkdtemp(prefix="mtllm-loop-bench-"))
    live, capture_dir = root / "live", root / "capture"
    for d in (live, capture_dir):
        _setup(d)
    stream = _work(400, seed=1)
    seen = {x["text"] for x in stream}
    ticket_tests = [x for x in dataset(120 if not quick else 60, seed=2, products=PRODUCTS) if x[0] not in seen]
    invoice_tests = [x for x in invoices(120 if not quick else 60, seed=2) if x[0] not in seen]

    log(f"[1/4] jac run {PROGRAM.name} in {live}: route a ticket, read an invoice, in turn, every 0.5 s")
    out_file, stop = live / "calls.jsonl", live / "STOP"
    t0 = time.time()
    proc = _jac_run(live, stream, {"BENCH_PACE_S": "0.5", "BENCH_MAX_CALLS": "100000"}, out_file, stop)
    store = Store(live / ".mtllm_locally" / "calls.sqlite3")
    reg = Registry(store)
    _watch(store, reg, out_file, proc, stop, t0 + (900 if quick else 1800), after=20, log=log)
    program_output = proc.stdout.read() if proc.stdout else ""
    running = reg.training()  # a follow-up training the loop started on its own: not part of the bench
    if running is not None and running.pid:
        os.kill(running.pid, signal.SIGTERM)
        log(f"      stopped the follow-up job {running.adapter_id} (the bench ends here)")
    wall = time.time() - t0
    calls = [json.loads(line) for line in open(out_file)] if out_file.exists() else []
    tasks = _tasks(store)
    if set(tasks) != set(TASKS):
        raise RuntimeError(f"the Jac program did not call both functions:\n{program_output[-3000:]}")

    log("[2/4] accuracy through the engine on inputs the program never saw (exact match)")
    tests = {"route": _test_examples(store, tasks["route"], "ticket", ticket_tests),
             "read_invoice": _test_examples(store, tasks["read_invoice"], "text", invoice_tests)}
    model_path = str(models.resolve(None))
    result: dict = {"goals": GOALS, "wall_s": wall, "calls": len(calls), "workdir": str(root), "tasks": {}}
    with Engine(model_path, n_ctx=4096) as eng:
        for fn in TASKS:
            key = tasks[fn]
            base_acc = served_accuracy(eng, None, tests[fn])
            versions = {v.adapter_id: v for v in reg.versions(key) if v.status in ("passed", "rejected")}
            acc = {a: served_accuracy(eng, v, tests[fn]) for a, v in versions.items()}
            log(f"      {fn}: base {base_acc:.3f}; " + ", ".join(
                f"{a.split('@')[1]} [{_what(versions[a])}] {x:.3f}" for a, x in acc.items()))
            promotions = [r for r in reg.log(key) if r["action"] == "promote"]
            # never worse: each promotion's test accuracy against what served before it
            before_each = [acc.get(r["previous"], base_acc) if r["previous"] else base_acc for r in promotions]
            after_each = [acc[r["adapter_id"]] for r in promotions]
            mine = [c for c in calls if c["function"] == fn]
            first = promotions[0] if promotions else None
            trained = next((r for r in promotions if versions[r["adapter_id"]].kind == "training"), None)
            tv = versions[trained["adapter_id"]] if trained else None
            result["tasks"][fn] = {
                "base": base_acc, "versions": acc, "n_test": len(tests[fn]),
                "calls_until_first_promotion": sum(1 for c in mine if c["t"] < first["created_at"]) if first else None,
                "first_promotion": first["adapter_id"] if first else None,
                "trigger_to_promotion_s": trained["created_at"] - tv.created_at if trained else None,
                "first_trained": tv.adapter_id if tv else None,
                "train_seconds": tv.metrics.get("train_seconds") if tv else None,
                "trained_steps": tv.metrics.get("steps") if tv else None,
                "idle_steps": tv.metrics.get("idle_steps") if tv else None,
                "promotions": [{"to": r["adapter_id"], "accuracy_before": b, "accuracy_after": a}
                               for r, b, a in zip(promotions, before_each, after_each)],
                "never_served_worse": all(a >= b for a, b in zip(after_each, before_each)),
                "fields": evaluate(eng, tests[fn], *_served_args(eng, reg.get(first["adapter_id"]) if first else None)
                                   ).fields if fn == "read_invoice" else None}
        latency = {fn: _p50([c["s"] for c in calls if c["function"] == fn]) for fn in TASKS}
        for fn in TASKS:
            r = result["tasks"][fn]
            log(f"      {fn}: first promotion after {r['calls_until_first_promotion']} of its calls "
                f"({r['first_promotion']}); first trained version {r['first_trained']}: trigger -> promotion "
                f"{_s(r['trigger_to_promotion_s'])} ({_s(r['train_seconds'])} training, {r['trained_steps']} steps, "
                f"{r['idle_steps']} of them on every core); call latency p50 {latency[fn]:.2f} s")

        log("[3/4] the learning curve: the loop replayed on the first n labelled calls of each task")
        cap_out, cap_stop = capture_dir / "calls.jsonl", capture_dir / "STOP"
        cap = _jac_run(capture_dir, stream, {"BENCH_PACE_S": "0", "BENCH_MAX_CALLS": str(2 * max(CURVE) + 40),
                                             "MTLLM_LOCALLY_LEARN": "0"}, cap_out, cap_stop)
        cap.wait(timeout=1800)
        capture = capture_dir / ".mtllm_locally" / "calls.sqlite3"
        cap_tasks = _tasks(Store(capture))
        policy = TaskPolicy(min_interval_s=0.0, threads=0)  # the defaults; the replay may use every core
        ns = (0, 20, 100) if quick else CURVE
        for fn in TASKS:
            result["tasks"][fn]["curve"] = learning_curve(capture, fn, cap_tasks[fn], tests[fn], eng, policy, ns,
                                                          log=log)
    ratios = {}
    for fn in TASKS:
        r = result["tasks"][fn]
        at = {p["labelled"]: p["accuracy"] for p in r["curve"]}
        r["accuracy_after_20"], r["accuracy_after_100"] = at.get(20), at.get(100)
        ratios[f"{fn}_accuracy_after_20_vs_base"] = at.get(20, 0) / max(r["base"], 1e-9)
        ratios[f"{fn}_accuracy_after_100"] = at.get(100)
        ratios[f"{fn}_trigger_to_promotion_s"] = r["trigger_to_promotion_s"]
        ratios[f"{fn}_calls_until_first_promotion"] = r["calls_until_first_promotion"]
    ratios["never_served_worse"] = all(result["tasks"][fn]["never_served_worse"] for fn in TASKS)
    result["ratios"] = ratios
    result["latency_p50_s"] = latency

    log("[4/4] figures")
    for k, v in ratios.items():
        log(f"      {k}: {v if not isinstance(v, float) else round(v, 3)}")
    try:
        from ..learn.plot import plot_curves

        result["plot"] = str(plot_curves({fn: result["tasks"][fn]["curve"] for fn in TASKS}, root / "loop.png",
                                         title="bench loop: held-out accuracy vs labelled calls"))
        log(f"      plot: {result['plot']}")
    except ImportError:
        result["plot"] = None
    return result


def _served_args(eng: Engine, v: AdapterVersion | None) -> tuple:
    adapters = [(eng.load_adapter(v.gguf_path), 1.0)] if v is not None and v.serves_adapter else []
    shown = demonstrations.load(v.demonstrations_path) if v is not None and v.serves_demonstrations else ()
    return adapters, shown


def _p50(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} s"
