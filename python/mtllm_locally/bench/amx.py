"""Is llama.cpp's AMX path worth having, where it runs? (README, "AMX")

Each configuration of the CPU backend's extra buffer types runs in its own child
process (AMX crashes on multi-token batches, llama.cpp #20824): no extra types,
CPU_REPACK only (our default), and AMX + CPU_REPACK (llama.cpp's default). For each:
single-stream decode, 8 concurrent streams, and a 512-token prompt, on the default
model as served (Q8_0) and as Q4_0. A crash is reported as the signal that ended it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from .. import _engine, models

CONFIGS = {"none": [], "repack": ["CPU_REPACK"], "amx+repack": ["AMX", "CPU_REPACK"]}

CHILD = r"""
import json, sys, time
from mtllm_locally import Engine, _engine
bufts, path, mode, n_tok = json.loads(sys.argv[1])
_engine.cpu_extra_buffer_types_enable(bufts)
with Engine(path, n_ctx=2048) as eng:
    if mode == "prompt":
        ids = [100 + i % 1000 for i in range(512)]
        eng.generate(ids[:16], max_tokens=1)
        t = time.perf_counter(); eng.generate(ids, max_tokens=1); dt = time.perf_counter() - t
        print(json.dumps({"tok_s": 512 / dt}))
    else:
        streams = 1 if mode == "decode1" else 8
        eng.generate([1], max_tokens=4, ignore_eos=True)
        t = time.perf_counter()
        reqs = [eng.submit([1, 2 + i], max_tokens=n_tok, ignore_eos=True) for i in range(streams)]
        n = sum(r.result().completion_tokens for r in reqs)
        print(json.dumps({"tok_s": n / (time.perf_counter() - t)}))
"""


def _run(bufts: list[str], path: str, mode: str, n_tok: int) -> dict:
    env = dict(os.environ, MTLLM_LOCALLY_VET="0", GGML_NO_BACKTRACE="1")
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps([bufts, path, mode, n_tok])], env=env,
                       capture_output=True, text=True, timeout=600)
    if p.returncode == 0:
        return json.loads(p.stdout.strip().splitlines()[-1])
    how = signal.Signals(-p.returncode).name if p.returncode < 0 else f"exit {p.returncode}"
    return {"crashed": how}


def run(quick: bool = False, log=print) -> dict:
    available = _engine.cpu_extra_buffer_types_available()
    log(f"CPU extra buffer types available here: {available}")
    n_tok = 32 if quick else 128
    src = models.embedded_default_path()
    paths = {"Q8_0": str(models.convert(src, models.FTYPE_Q8_0)), "Q4_0": str(models.convert(src, models.FTYPE_Q4_0))}
    results: dict = {}
    for qname, path in paths.items():
        for cname, bufts in CONFIGS.items():
            if any(b not in available for b in bufts):
                continue
            for mode in ("decode1", "decode8", "prompt"):
                r = _run(bufts, path, mode, n_tok)
                results[f"{qname}/{cname}/{mode}"] = r
                log(f"{qname:5s} {cname:11s} {mode:8s} " + (f"{r['tok_s']:8.1f} tok/s" if "tok_s" in r else f"CRASHED ({r['crashed']})"))
    ratios = {}
    for qname in paths:
        ours = results.get(f"{qname}/repack/decode8", {}).get("tok_s")
        none = results.get(f"{qname}/none/decode8", {}).get("tok_s")
        if ours and none:
            ratios[f"repack_vs_none_decode8_{qname}"] = ours / none
        for mode in ("decode1", "decode8"):  # where AMX runs at all: one token per step
            amx = results.get(f"{qname}/amx+repack/{mode}", {}).get("tok_s")
            base = results.get(f"{qname}/repack/{mode}", {}).get("tok_s")
            if base and amx:
                ratios[f"amx_vs_ours_{mode}_{qname}"] = amx / base
        if f"{qname}/amx+repack/prompt" in results:
            ratios[f"amx_prompt_crashed_{qname}"] = float("crashed" in results[f"{qname}/amx+repack/prompt"])
    return {"available": available, "results": results, "ratios": ratios,
            "goals": {k: "1 = AMX crashes here, so it stays off" for k in ratios if k.startswith("amx_prompt")}}
