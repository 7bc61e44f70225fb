"""The process cases run in (python -m mtllm_locally.fuzz.child '<json job>').

It runs its cases one after another against one shared engine and reports each as a
JSON line on its own copy of stdout (everything else printed goes to stderr):

    {"ready": true}
    {"start": i, "label": ..., "desc": ...}     before case i runs
    {"health": i}                               case i returned; checking the engine
    {"end": i, "outcome": "ok"|"clean"|"unclean"|"dead", "error": ..., "seconds": ...}
    {"closing": true} / {"done": true}

"clean" means the case raised an MtllmError; "unclean" another exception; "dead"
that the shared engine no longer served a plain request afterwards. A crash is the
process dying (the parent sees the exit), a hang a line that never comes. The
address space is capped so runaway allocations fail here instead of on the host;
faulthandler prints every thread's Python stack on a fatal signal (and on the
SIGABRT the parent sends to a hung child), so reports say where it happened.
"""

from __future__ import annotations

import faulthandler
import json
import os
import resource
import sys
import threading
import time
import traceback


def _limit_memory(nbytes: int) -> None:
    if nbytes > 0:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = nbytes if hard == resource.RLIM_INFINITY else min(nbytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _describe(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    # the innermost frame of the package (not of the fuzzer): where the boundary let it through
    ours = [f for f in tb if "mtllm_locally" in f.filename and "/fuzz/" not in f.filename]
    f = ours[-1] if ours else tb[-1] if tb else None
    where = f" at {os.path.basename(f.filename)}:{f.lineno} ({f.name})" if f else ""
    msg = str(e).replace("\n", " ")
    return f"{type(e).__name__}: {msg[:300]}{where}"


def run_case(case, ctx) -> tuple[str, str]:
    from ..errors import MtllmError

    try:
        case.run(ctx)
        return "ok", ""
    except MtllmError as e:
        return "clean", _describe(e)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - anything else is the finding
        return "unclean", _describe(e)


def health(ctx, timeout: float) -> str:
    """'' if the shared engine still answers a plain request, else why not."""
    out: list[str] = []

    def check():
        try:
            c = ctx.shared_engine().generate("Hello", max_tokens=2)
            out.append("" if c.completion_tokens >= 1 else f"no tokens generated ({c.finish_reason})")
        except BaseException as e:  # noqa: BLE001
            out.append(_describe(e))

    t = threading.Thread(target=check, daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else f"no answer within {timeout:.0f} s"


def main(job: dict) -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    faulthandler.enable(file=sys.stderr, all_threads=True)
    _limit_memory(int(job.get("mem_limit", 0)))

    def send(**msg):
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    from .context import Context
    from .corpus import make_case

    ctx = Context(job["workdir"], job["tiny"], job["lora"])
    why = health(ctx, 60)
    if why:
        send(failed=f"the fuzz engine does not work before any case: {why}")
        os._exit(3)
    send(ready=True)
    kinds = tuple(job["kinds"]) if job.get("kinds") else None
    for i in job["indices"]:
        try:
            case = make_case(job["seed"], i, kinds)
        except Exception as e:  # noqa: BLE001 - a bug of the fuzzer itself
            send(start=i, label="fuzz/build", desc="building the case failed")
            send(end=i, outcome="error", error=_describe(e))
            continue
        send(start=i, label=case.label, desc=case.desc)
        t0 = time.monotonic()
        outcome, error = run_case(case, ctx)
        seconds = time.monotonic() - t0
        ctx.end_case()
        send(health=i)
        why = health(ctx, 0.8 * job["timeout"])
        if why:
            outcome, error = "dead", f"engine stopped serving after this case ({outcome}: {error}): {why}"
            ctx.replace_shared_engine()
        send(end=i, outcome=outcome, error=error, seconds=round(seconds, 3))
    send(closing=True)
    if ctx.engine is not None:
        ctx.engine.close()
    send(done=True)
    proto.close()
    os._exit(0)  # skip interpreter teardown: a fuzzed leftover must not hang the exit


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
