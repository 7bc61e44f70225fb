"""Inference bench: our engine vs llama-cpp-python's `Llama` on the same GGUF.

Ratios (goal in brackets):
  decode_single            our single-stream decode tok/s / theirs, same file        [>= 1.0]
  decode_concurrent_8      our aggregate tok/s, 8 concurrent / theirs, 8 in a row    [>= 1.5]
  default_model_speedup_8  same, but we serve the default as we choose (Q8_0)        [>= 3.0]
  ttft_prefix_reuse        by-llm()-like TTFT without prefix reuse / with it        [>= 5]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import Engine, models

GOALS = {"decode_single": ">= 1.0", "decode_concurrent_8": ">= 1.5", "default_model_speedup_8": ">= 3.0",
         "ttft_prefix_reuse": ">= 5"}

STORY_PROMPTS = [
    f"<|im_start|>user\nWrite a long, detailed story about {topic}.<|im_end|>\n<|im_start|>assistant\n"
    for topic in ("a dragon who learns to cook", "a lighthouse keeper on Mars", "a robot gardener",
                  "two rival bakers", "a lost library", "a time-travelling cat", "a mountain rescue",
                  "a tiny submarine", "a city of bridges", "a clockmaker's apprentice", "an honest thief",
                  "a singing glacier", "a chess tournament", "the last bus home", "a secret garden",
                  "a moon festival")
]


def _threads() -> int:
    return os.cpu_count() or 1


def _their_runs(model: str, prompts: list[str], max_tokens: int, n_ctx: int = 2048) -> dict:
    job = {"model": model, "n_ctx": n_ctx, "n_threads": _threads(),
           "runs": [{"prompt": p, "max_tokens": max_tokens} for p in prompts]}
    return run_worker(job)


def run_worker(job: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "mtllm_locally.bench.llama_cpp_python_worker"],
                          input=json.dumps(job), capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-cpp-python worker failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def _our_single(eng: Engine, prompt: str, max_tokens: int) -> dict:
    ids = eng.tokenize(prompt, add_special=False, parse_special=True)
    t0 = time.perf_counter()
    t_first = None
    n = 0
    for chunk in eng.stream(ids, max_tokens=max_tokens, ignore_eos=True):
        n += len(chunk.token_ids)
        if t_first is None:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    return {"n_gen": n, "ttft_s": t_first - t0, "decode_s": t_end - t_first, "total_s": t_end - t0}


def _our_concurrent(eng: Engine, prompts: list[str], max_tokens: int) -> float:
    """Aggregate tok/s with len(prompts) requests in flight at once (prefill included)."""
    ids = [eng.tokenize(p, add_special=False, parse_special=True) for p in prompts]
    t0 = time.perf_counter()
    reqs = [eng.submit(i, max_tokens=max_tokens, ignore_eos=True) for i in ids]
    n = sum(r.result().completion_tokens for r in reqs)
    return n / (time.perf_counter() - t0)


def _ttft_by_llm(eng: Engine, n_functions: int, rounds: int) -> float:
    """Mean TTFT of `by llm()`-like calls: per function a long shared system text,
    per call a short input; functions interleaved; first call of each excluded."""
    system = ("You are the Jac function `{name}`. Follow the function's contract exactly. "
              "Return only a JSON value that matches the declared return type. "
              "Rules: be concise; never invent fields; prefer the most specific enum member; "
              "when unsure, choose the safest valid value. ") * 6
    funcs = [system.format(name=f"classify_{i}") + f"Function description {i}: " + "details " * 40
             for i in range(n_functions)]
    ttfts = []
    for r in range(rounds + 1):
        for i, sys_text in enumerate(funcs):
            msgs = [{"role": "system", "content": sys_text}, {"role": "user", "content": f"Input #{r}-{i}: item {r * 7 + i}"}]
            c = eng.generate(messages=msgs, max_tokens=1)
            if r > 0:
                ttfts.append(c.timings["ttft_ms"])
    return float(np.mean(ttfts))


def _layouts(text_prompts: list[str], max_tokens: int, log) -> dict:
    """Each layout we could serve the default in: speed at 1/8 concurrent, and the
    quality cost against the shipped Q4_1 (next-token KL and top-1 agreement,
    teacher-forced on the same tokens)."""
    src = models.embedded_default_path()
    paths = {"q4_1": src, "q8_0": models.convert(src, models.FTYPE_Q8_0), "q4_0": models.convert(src, models.FTYPE_Q4_0)}
    logits, speed = {}, {}
    for name, path in paths.items():
        with Engine(str(path), n_ctx=4096) as eng:
            _our_concurrent(eng, STORY_PROMPTS[8:10], 8)
            speed[name] = {n: _our_concurrent(eng, STORY_PROMPTS[:n], max_tokens) for n in (1, 8)}
            rows = []
            for p in text_prompts:
                ids = eng.tokenize(p, add_special=False, parse_special=True)
                req = eng.submit(ids, max_tokens=1, logits_all=True)
                req.result()
                rows.append(req.logits())
            logits[name] = np.concatenate(rows)

    def logsoftmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    ref = logsoftmax(logits["q4_1"])
    out = {}
    for name in paths:
        b = logsoftmax(logits[name])
        out[name] = {"tok_s_1": speed[name][1], "tok_s_8": speed[name][8],
                     "kl_to_q4_1": float(np.mean(np.sum(np.exp(ref) * (ref - b), axis=1))),
                     "top1_agreement": float(np.mean(ref.argmax(1) == b.argmax(1)))}
        log(f"      {name}: {out[name]['tok_s_1']:6.1f} / {out[name]['tok_s_8']:6.1f} tok/s (1 / 8 concurrent), "
            f"KL to Q4_1 {out[name]['kl_to_q4_1']:.4f}, top-1 agreement {out[name]['top1_agreement']:.3f}")
    return out


def run(quick: bool = False, log=print) -> dict:
    max_tokens = 48 if quick else 128
    shipped = str(models.embedded_default_path())
    fast = str(models.resolve(None, fast_default=True))
    result: dict = {"model_shipped": shipped, "model_served": fast, "threads": _threads(),
                    "max_tokens": max_tokens, "goals": GOALS}

    log(f"[1/5] llama-cpp-python on the shipped file ({os.path.basename(shipped)}), its own process")
    warm = STORY_PROMPTS[15]
    theirs = _their_runs(shipped, [warm] + [STORY_PROMPTS[0]] * 2 + STORY_PROMPTS[:8], max_tokens)
    runs = theirs["runs"][3:]  # first run is warm-up; best of 3 single-stream runs
    their_single = max((r["n_gen"] - 1) / r["decode_s"] for r in theirs["runs"][1:4])
    their_serial_8 = sum(r["n_gen"] for r in runs) / sum(r["total_s"] for r in runs)
    result["llama_cpp_python"] = {"decode_tok_s": their_single, "serial_8_tok_s": their_serial_8,
                                  "ttft_ms": 1000 * float(np.mean([r["ttft_s"] for r in runs]))}
    log(f"      decode {their_single:.1f} tok/s; 8 requests in a row {their_serial_8:.1f} tok/s")

    log("[2/5] ours on the same file")
    with Engine(shipped, n_ctx=4096) as eng:
        _our_single(eng, warm, 16)
        singles = [_our_single(eng, STORY_PROMPTS[0], max_tokens) for _ in range(3)]
        our_single = max((s["n_gen"] - 1) / s["decode_s"] for s in singles)
        _our_concurrent(eng, STORY_PROMPTS[8:16], 8)
        our_conc_8_same = _our_concurrent(eng, STORY_PROMPTS[:8], max_tokens)
    log(f"      decode {our_single:.1f} tok/s; 8 concurrent {our_conc_8_same:.1f} tok/s")

    log(f"[3/5] ours on the default as served ({os.path.basename(fast)}): 1/2/4/8/16 concurrent")
    scaling = {}
    with Engine(None, n_ctx=4096) as eng:
        _our_concurrent(eng, STORY_PROMPTS[8:16], 8)
        for n in (1, 2, 4, 8, 16):
            scaling[n] = _our_concurrent(eng, STORY_PROMPTS[:n], max_tokens)
            log(f"      {n:2d} concurrent: {scaling[n]:7.1f} tok/s")
        long_ids = eng.tokenize(" ".join(STORY_PROMPTS) * 3, add_special=False, parse_special=True)[:1500]
        eng.generate(long_ids[:64], max_tokens=1)
        t0 = time.perf_counter()
        eng.submit(long_ids, max_tokens=1).result()
        prompt_tok_s = len(long_ids) / (time.perf_counter() - t0)
    log(f"      prompt processing {prompt_tok_s:.0f} tok/s")

    log("[4/5] TTFT of by-llm()-like calls, 8 functions interleaved: prefix reuse off vs on")
    rounds = 2 if quick else 4
    with Engine(None, n_ctx=4096, prefix_reuse=False) as eng:
        ttft_cold = _ttft_by_llm(eng, 8, rounds)
    with Engine(None, n_ctx=4096, prefix_reuse=True) as eng:
        ttft_warm = _ttft_by_llm(eng, 8, rounds)
    log(f"      TTFT without reuse {ttft_cold:.1f} ms, with reuse {ttft_warm:.1f} ms")

    log("[5/5] serving layouts of the default model: speed and quality cost vs the shipped Q4_1")
    quality = _layouts(STORY_PROMPTS[:4] + [
        "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type, oil-based ink and a screw press into a system that could produce "
        "books quickly and cheaply. Within fifty years, presses had spread to more than two hundred cities."],
        max_tokens, log)

    result["ours"] = {"decode_tok_s_same_file": our_single, "concurrent_8_tok_s_same_file": our_conc_8_same,
                      "concurrent_tok_s_default": scaling, "prompt_tok_s_default": prompt_tok_s,
                      "ttft_ms_no_reuse": ttft_cold, "ttft_ms_reuse": ttft_warm}
    result["layouts"] = quality
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["ratios"] = {
        "decode_single": our_single / their_single,
        "decode_concurrent_8": our_conc_8_same / their_serial_8,
        "default_model_speedup_8": scaling[8] / their_serial_8,
        "ttft_prefix_reuse": ttft_cold / ttft_warm,
    }
    return result
