"""python -m mtllm_locally.fuzz: run the fuzzer, or reproduce cases.

    python -m mtllm_locally.fuzz --cases 500 --seed 3 [--jobs 2] [--json]
    python -m mtllm_locally.fuzz --seed 3 --case 41              # in a child, as in the run
    python -m mtllm_locally.fuzz --seed 3 --case 41 --inline     # in this process (tracebacks, pdb)
    python -m mtllm_locally.fuzz --seed 3 --case 41 --show       # just say what case 41 is

Exit status 1 if any case crashed, hung, failed uncleanly or left the engine dead.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mtllm_locally.fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=200, help="how many cases (from --start)")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--case", type=int, action="append", help="run exactly this case (repeatable, in order)")
    ap.add_argument("--kinds", help="only these kinds, comma-separated (model,adapter,schema,grammar,sampling,"
                                    "messages,template,requests,config)")
    ap.add_argument("--batch", type=int, default=25, help="cases per child process")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds a case may take before it is a hang")
    ap.add_argument("--jobs", type=int, default=1, help="child processes at once")
    ap.add_argument("--inline", action="store_true", help="with --case: run in this process")
    ap.add_argument("--show", action="store_true", help="with --case: print the cases and run nothing")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    kinds = tuple(args.kinds.split(",")) if args.kinds else None
    log = (lambda *a: print(*a, file=sys.stderr, flush=True))

    if args.case and (args.show or args.inline):
        return _local(args.seed, args.case, kinds, args.inline)

    from .harness import Fuzzer

    fz = Fuzzer(args.seed, batch=args.batch, timeout=args.timeout, jobs=args.jobs, kinds=kinds, log=log)
    try:
        if args.case:
            outcomes = fz.run_batch(list(args.case))
            from .harness import FuzzResult

            result = FuzzResult(args.seed, outcomes)
            for o in outcomes:
                took = f", {o.seconds:.1f} s" if o.seconds else ""
                print(f"case {o.index} [{o.label}] {o.outcome}{' (' + o.phase + ')' if o.phase else ''}{took}: {o.desc}")
                if o.detail:
                    print("  " + o.detail.replace("\n", "\n  "))
        else:
            result = fz.run(args.cases, args.start)
            print(json.dumps(result.to_dict(), indent=2) if args.json else result.report())
    finally:
        fz.close()
    c = result.counts
    return 1 if c["crashes"] or c["hangs"] or c["unclean"] or c["dead"] or c["harness_errors"] else 0


def _local(seed: int, indices: list[int], kinds, run: bool) -> int:
    """Build (and with run, execute) cases in this process, with full tracebacks."""
    import traceback

    from .context import Context
    from .corpus import make_case
    from .tiny import tiny_llama, tiny_lora

    bad = 0
    with tempfile.TemporaryDirectory(prefix="mtllm-fuzz-") as tmp:
        ctx = None
        if run:
            tiny_llama().write(f"{tmp}/tiny.gguf")
            tiny_lora().write(f"{tmp}/tiny-lora.gguf")
            ctx = Context(tmp, f"{tmp}/tiny.gguf", f"{tmp}/tiny-lora.gguf")
        for i in indices:
            case = make_case(seed, i, kinds)
            print(f"case {i} [{case.label}]: {case.desc}\n  repro: {case.repro}", flush=True)
            if not run:
                continue
            from ..errors import MtllmError

            try:
                case.run(ctx)
                print("  -> returned normally")
            except MtllmError as e:
                print(f"  -> clean {type(e).__name__}: {e}")
            except Exception:  # noqa: BLE001
                bad += 1
                print("  -> UNCLEAN")
                traceback.print_exc()
            finally:
                ctx.end_case()
        if ctx is not None and ctx.engine is not None:
            ctx.engine.close()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
