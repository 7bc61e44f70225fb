"""Jac bench: one Jac program (60 typed `by llm()` calls over two functions, half of
them concurrent) on our provider and on byllm's own in-process `local:` path
(llama-cpp-python), both on the shipped SmolLM2 file, in one run.

Ratios: jac_wall_speedup (byllm local wall / ours, goal >= 10) and typed_parse_rate
(ours: share of calls byllm parsed on the first model turn, goal 1.0).

byllm's `local:` path only knows its own aliases; we point one at the shipped GGUF
through JAC_MODELS_DIR (a symlink), so nothing is downloaded. llama-cpp-python's
`Llama` is not thread-safe, so byllm local runs the extractions one at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import models
from ..state.store import Store

GOALS = {"jac_wall_speedup": ">= 10", "typed_parse_rate": "= 1.0"}
PROGRAM = Path(__file__).with_name("jac_program.jac")


def _run(workdir: Path, model: str, workers: int, env_extra: dict) -> tuple[float, dict, str]:
    env = dict(os.environ, BENCH_MODEL=model, BENCH_WORKERS=str(workers), **env_extra)
    jac = Path(sys.executable).with_name("jac")
    t0 = time.perf_counter()
    proc = subprocess.run([str(jac), "run", PROGRAM.name], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=7200)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"jac run failed for {model}:\n{proc.stderr[-3000:]}")
    return wall, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _valid(result: dict) -> int:
    ok = sum(1 for r in result["routed"] if r.startswith("Department."))
    ok += sum(1 for e in result["extracted"] if not e.startswith("ERROR"))
    return ok


def run(quick: bool = False, log=print) -> dict:
    shipped = models.embedded_default_path()
    work = Path(tempfile.mkdtemp(prefix="mtllm-jac-bench-"))
    shutil.copy(PROGRAM, work / PROGRAM.name)
    models_dir = work / "jac-models"
    (models_dir / "gemma-4-e4b").mkdir(parents=True)
    os.symlink(shipped, models_dir / "gemma-4-e4b" / "gemma-4-E4B-it-Q4_K_M.gguf")

    log("[1/2] ours: jac run with Model('mtllm_locally/default'), extractions 8 at a time")
    ours_dir = work / "ours"
    ours_dir.mkdir()
    shutil.copy(PROGRAM, ours_dir / PROGRAM.name)
    our_wall, ours, _ = _run(ours_dir, "mtllm_locally/default", 8, {})
    store = Store(ours_dir / ".mtllm_locally" / "calls.sqlite3")
    calls = store.calls()
    first_try = sum(1 for c in calls if c["accepted"] == 1 and c["n_turns"] == 1)
    log(f"      {our_wall:.1f} s wall ({ours['route_s']:.1f} s routing, {ours['extract_s']:.1f} s extracting); "
        f"{_valid(ours)}/60 valid; {first_try}/{len(calls)} parsed on the first model turn")

    log("[2/2] byllm's local: path (llama-cpp-python) on the same file, one call at a time")
    theirs_dir = work / "theirs"
    theirs_dir.mkdir()
    shutil.copy(PROGRAM, theirs_dir / PROGRAM.name)
    their_wall, theirs, their_err = _run(theirs_dir, "local:gemma-4-e4b", 1,
                                         {"JAC_MODELS_DIR": str(models_dir), "MTLLM_LOCALLY_CAPTURE": "0"})
    their_valid = _valid(theirs)
    retries = their_err.count("Retrying") + their_err.count("retry")
    log(f"      {their_wall:.1f} s wall ({theirs['route_s']:.1f} s routing, {theirs['extract_s']:.1f} s extracting); "
        f"{their_valid}/60 valid; parse failures {60 - their_valid}; retry messages {retries}")
    return {
        "goals": GOALS,
        "ours": {"wall_s": our_wall, "valid": _valid(ours), "first_turn_parsed": first_try, "calls": len(calls),
                 "results": ours},
        "byllm_local": {"wall_s": their_wall, "valid": their_valid, "retry_messages": retries, "results": theirs},
        "ratios": {"jac_wall_speedup": their_wall / our_wall,
                   "typed_parse_rate": first_try / max(1, len(calls))},
    }
