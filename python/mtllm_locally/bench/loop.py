"""Loop bench, the main demo: a Jac program routes a stream of support tickets with
`def route(ticket: str) -> Team by llm();` on the embedded model, and gets better at
it by itself while it runs. Its jac.toml names a teacher for `route` (an oracle
LiteLLM provider standing in for a big model); everything else is the default loop:
capture -> trigger -> background training -> gate -> promotion -> hot deploy.

The harness only watches the store and, at the end, measures held-out accuracy
through the engine on tickets the program never saw: the base model and every
evaluated adapter version, in this run. Ratio: loop_accuracy_gain = promoted / base.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import Engine, models
from ..learn.dataset import Example
from ..learn.gate import evaluate
from ..state.registry import Registry
from ..state.store import Store
from .oracle import PRODUCTS
from .train import dataset

GOALS = {"loop_accuracy_gain": "> 1", "after": ">= 0.9", "calls_until_first_promotion": "<= 200"}
PROGRAM = Path(__file__).with_name("loop_program.jac")
JAC_TOML = """\
[project]
name = "support-desk"

# The learning loop. Everything not named here is the default.
[plugins.mtllm_locally]
min_new_examples = {min_new}

[plugins.mtllm_locally.tasks.route]
teacher = "oracle/route"
"""


def _test_examples(store: Store, task_key: str, tickets: list[tuple[str, int]]) -> list[Example]:
    """Held-out tickets in exactly the prompt byllm builds: a captured prompt of the
    task with its ticket text swapped."""
    row = store.rows("SELECT t.messages_json, t.response_format_json, c.inputs_json FROM turns t JOIN calls c "
                     "ON c.invocation_id=t.invocation_id WHERE c.task_key=? AND c.inputs_json IS NOT NULL "
                     "LIMIT 1", (task_key,))[0]
    template, rf = row["messages_json"], json.loads(row["response_format_json"])
    seen = json.loads(row["inputs_json"])["ticket"]
    out = []
    for i, (text, team) in enumerate(tickets):
        msgs = json.loads(template.replace(seen, text))
        out.append(Example(f"test-{i}", str(i), msgs, None, rf, json.dumps({"schema_object_wrapper": team}),
                           "teacher", 0.0, True))
    return out


def _watch(store: Store, reg: Registry, out_file: Path, proc, stop: Path, deadline: float, after_promotion: int,
           log) -> None:
    seen_status: dict[str, str] = {}
    promoted_at = None
    while proc.poll() is None and time.time() < deadline:
        time.sleep(2)
        n = sum(1 for _ in open(out_file)) if out_file.exists() else 0
        for v in reg.versions():
            if seen_status.get(v.adapter_id) != v.status:
                seen_status[v.adapter_id] = v.status
                extra = ""
                if v.status in ("passed", "rejected"):
                    extra = (f": held-out {v.metrics.get('candidate_score', 0):.2f} vs "
                             f"{v.metrics.get('baseline_score', 0):.2f}, trained on {v.data.get('n_train')} examples "
                             f"in {v.metrics.get('train_seconds', 0):.0f} s")
                log(f"      call {n:4d}: {v.adapter_id} {v.status}{extra}")
        if promoted_at is None and any(r["action"] == "promote" for r in reg.log()):
            promoted_at = n
            log(f"      call {n:4d}: promoted; the program's next calls are served by the adapter")
        if promoted_at is not None and n >= promoted_at + after_promotion:
            break
    stop.touch()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()


def run(quick: bool = False, log=print) -> dict:
    work = Path(tempfile.mkdtemp(prefix="mtllm-loop-bench-"))
    stream = [t for t, _ in dataset(600, seed=1, products=PRODUCTS)]
    test = [x for x in dataset(240 if not quick else 80, seed=2, products=PRODUCTS) if x[0] not in set(stream)]
    min_new = 160
    shutil.copy(PROGRAM, work / PROGRAM.name)
    (work / "jac.toml").write_text(JAC_TOML.format(min_new=min_new))
    (work / "tickets.json").write_text(json.dumps(stream))
    out_file, stop = work / "calls.jsonl", work / "STOP"
    env = dict(os.environ, BENCH_TICKETS=str(work / "tickets.json"), BENCH_OUT=str(out_file),
               BENCH_STOP=str(stop), BENCH_PACE_S="0.5", BENCH_MAX_CALLS="100000")  # stopped by the harness
    env.pop("MTLLM_LOCALLY_STORE", None)
    log(f"[1/3] jac run {PROGRAM.name} in {work}: a ticket every 0.5 s; the loop trains after "
        f"{min_new} teacher-labelled calls")
    t0 = time.time()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("jac")), "run", PROGRAM.name], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    store = Store(work / ".mtllm_locally" / "calls.sqlite3")
    reg = Registry(store)
    _watch(store, reg, out_file, proc, stop, t0 + (1200 if quick else 2400), after_promotion=40, log=log)
    program_output = proc.stdout.read() if proc.stdout else ""
    running = reg.training()  # a follow-up training the loop started on its own: not part of the bench
    if running is not None and running.pid:
        os.kill(running.pid, signal.SIGTERM)
        log(f"      stopped the follow-up training {running.adapter_id} (the bench ends here)")
    wall = time.time() - t0
    calls = [json.loads(line) for line in open(out_file)] if out_file.exists() else []
    if not calls:
        raise RuntimeError(f"the Jac program made no calls:\n{program_output[-3000:]}")
    task = store.tasks()[0]["task_key"]

    log(f"[2/3] held-out accuracy through the engine on {len(test)} tickets the program never saw")
    examples = _test_examples(store, task, test)
    versions = [v for v in reg.versions(task) if v.status in ("passed", "rejected")]
    served = str(models.resolve(None))
    with Engine(served, n_ctx=4096) as eng:
        before = evaluate(eng, examples).exact
        acc = {v.adapter_id: evaluate(eng, examples, [(eng.load_adapter(v.gguf_path), 1.0)]).exact
               for v in versions}
    log(f"      base model {before:.3f} (chance 0.25); " +
        ", ".join(f"{k.split('@')[1]} {a:.3f}" for k, a in acc.items()))

    log("[3/3] the program's calls over time")
    promotions = [r for r in reg.log(task) if r["action"] == "promote"]
    first = promotions[0] if promotions else None
    truth = {t: team for t, team in dataset(600, seed=1, products=PRODUCTS)}
    timeline, served_by = [], store.rows("SELECT inputs_json, source, adapter FROM calls ORDER BY created_at")
    for k, c in enumerate(calls):
        deployed = next((p["adapter_id"] for p in reversed(promotions) if p["created_at"] <= c["t"]), None)
        timeline.append({"calls": k + 1, "accuracy": acc.get(deployed, before), "version": deployed,
                         "correct": c["team"] == truth.get(c["ticket"])})
    calls_until = next((p["calls"] - 1 for p in timeline if p["version"] is not None), None)
    after = acc.get(first["adapter_id"]) if first else before
    promoted = reg.get(first["adapter_id"]) if first else None
    windows = [sum(p["correct"] for p in timeline[i:i + 50]) / len(timeline[i:i + 50])
               for i in range(0, len(timeline), 50)]
    by_source = {"teacher": sum(1 for r in served_by if (r["source"] or "").startswith("teacher")),
                 "adapter": sum(1 for r in served_by if r["adapter"]),
                 "base": sum(1 for r in served_by if not r["adapter"] and not (r["source"] or "").startswith("teacher"))}
    log(f"      {len(calls)} calls in {wall:.0f} s; answered by teacher {by_source['teacher']}, "
        f"adapter {by_source['adapter']}, base {by_source['base']}")
    log(f"      answers right per 50 calls (teacher answers count as right): "
        + " ".join(f"{w:.2f}" for w in windows))
    if promoted:
        log(f"      first promotion after call {calls_until}: {promoted.adapter_id}, trained on "
            f"{promoted.data['n_train']} examples ({promoted.data['n_heldout']} held out) in "
            f"{promoted.metrics['train_seconds']:.0f} s; held-out accuracy {before:.3f} -> {after:.3f}")
    else:
        log("      no promotion happened")
    latency = {}
    if promoted:
        def p50(xs):
            xs = sorted(xs)
            return xs[len(xs) // 2] if xs else None
        latency = {"before_training": p50([c["s"] for c in calls if c["t"] < promoted.created_at]),
                   "during_training": p50([c["s"] for c in calls
                                           if promoted.created_at <= c["t"] < (promoted.finished_at or 0)]),
                   "after_promotion": p50([c["s"] for c in calls if c["t"] >= first["created_at"]])}
        log("      call latency p50 (s): " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in latency.items()
                                                      if v is not None))
    plot = None
    try:
        from ..learn.plot import plot_versions

        plot = str(plot_versions(reg, work / "loop.png", timeline=timeline,
                                 title="bench loop: route() getting better while the program runs"))
    except ImportError:
        pass
    return {"goals": GOALS, "before": before, "after": after, "versions": acc, "calls": len(calls),
            "calls_until_first_promotion": calls_until, "wall_s": wall, "answered_by": by_source,
            "train_seconds": promoted.metrics["train_seconds"] if promoted else None,
            "training_wall_s": (promoted.finished_at - promoted.created_at) if promoted else None,
            "n_train": promoted.data["n_train"] if promoted else None,
            "gate": promoted.metrics if promoted else None, "windows_of_50": windows, "plot": plot,
            "latency_p50_s": latency,
            "workdir": str(work), "products": len(PRODUCTS),
            "ratios": {"loop_accuracy_gain": after / max(before, 1e-9)}}
