"""GPU bench (issue 17): the README's CUDA build of llama.cpp and training on a CUDA torch
device, each against the CPU, on one GGUF in one run.

The GGUF has SmolLM2-135M's architecture, tensor names, shapes and types (Q8_0 as we serve
it, norms f32) and its real tokenizer and chat template, with random weights
(skeleton_models.py; the real file is over what a lent GPU machine can be sent). Speed
depends only on shapes and types, so the timings are the real model's; outputs are noise,
the same noise on both backends, which is what the comparisons need.

Measured, warm-up excluded:
  decode tok/s, 1 and 8 concurrent requests of a fixed length (ignore_eos), n_gpu_layers 0 vs 99;
  greedy tokens of the GPU engine vs the CPU engine on a few prompts (and, at each first
  divergence, how far apart the two candidates were), and their prompt logits;
  training seconds per step, same TrainConfig, data and steps, on "cpu" and "cuda" (and
  cuda with bf16 autocast, for the record);
  a LoRA trained on cuda, exported to GGUF, loaded into the GPU engine and generating.
The n_gpu_layers=0 engine is the CPU's alone only with GGML_OP_OFFLOAD_MIN_BATCH set high
before Python starts (scripts/gpu_check.sh does): a CUDA build of llama.cpp otherwise runs
the matrix products of 32+-token batches on the GPU even then.
Without a GPU (torch sees no CUDA device, or llama.cpp has no GPU backend:
`llama_supports_gpu_offload`) the CPU figures are still measured, the result names what is
missing and why, and the process exits non-zero: no GPU figure is ever estimated.

    MTLLM_LOCALLY_GPU_SKELETON=.gpu/smollm2-135m-q8_0.skeleton.json.xz python -m mtllm_locally.bench gpu --json
(without the variable the skeleton is taken from the embedded default model, when installed).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import Engine, _engine, models
from . import skeleton_models

SKELETON_ENV = "MTLLM_LOCALLY_GPU_SKELETON"
ALL_LAYERS = 99        # n_gpu_layers: more than the model has, so every layer and the output go to the GPU
TRAIN_STEPS = 20       # measured steps per device (each after a 2-step warm-up run)
BATCH = 8
EXIT_MISSING = 3       # the exit status when a GPU figure could not be measured
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "Translate to German: good morning", "1, 2, 3, 4,", "<|im_start|>user\nName a fruit.<|im_end|>\n"]
GOALS = {"gpu_decode_speedup_1": "> 1 (reported)", "gpu_decode_speedup_8": "> 1 (reported)",
         "gpu_train_step_speedup": "> 1 (reported)",
         "gpu_greedy_match": "close to 1; each divergence at a near tie (random weights)"}


def llama_gpu() -> dict:
    """What the linked llama.cpp offers: llama_supports_gpu_offload() (the binding) and its
    backend devices, read through ctypes from the ggml library the engine module loaded (an
    empty list where it cannot be found: not Linux)."""
    libs = {}
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                m = re.search(r"(/\S*/lib(llama|ggml)\.so[.\d]*)$", line.strip())
                if m:
                    libs.setdefault(m.group(2), m.group(1))
    except OSError:
        pass
    out: dict = {"supports_gpu_offload": _engine.supports_gpu_offload(), "devices": [], "libllama": libs.get("llama")}
    if "ggml" in libs:
        g = ctypes.CDLL(libs["ggml"])
        g.ggml_backend_dev_count.restype = ctypes.c_size_t
        g.ggml_backend_dev_get.restype = ctypes.c_void_p
        g.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        for fn in (g.ggml_backend_dev_name, g.ggml_backend_dev_description):
            fn.restype, fn.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        for i in range(g.ggml_backend_dev_count()):
            d = g.ggml_backend_dev_get(i)
            out["devices"].append(f"{g.ggml_backend_dev_name(d).decode()}: {g.ggml_backend_dev_description(d).decode()}")
    return out


class LlamaLog:
    """llama.cpp's log lines (info and above) while the block runs; silent again after."""

    def __enter__(self):
        self.lines: list[str] = []
        _engine.set_log_sink(lambda level, text: self.lines.append(text.rstrip()), 2)
        return self

    def __exit__(self, *exc):
        _engine.set_log_sink(None)

    def offloaded(self) -> tuple[int, int] | None:
        """(layers on the GPU, layers) from llama.cpp's load message, None if it said nothing."""
        for line in self.lines:
            m = re.search(r"offloaded (\d+)/(\d+) layers to GPU", line)
            if m:
                return int(m.group(1)), int(m.group(2))
        return None


def decode_rate(eng: Engine, streams: int, n_tokens: int) -> float:
    """Aggregate tok/s of `streams` concurrent requests generating exactly n_tokens each."""
    warm = [eng.submit([1, 2 + i], max_tokens=8, ignore_eos=True) for i in range(streams)]  # same batch shapes
    for r in warm:
        r.result()
    t = time.perf_counter()
    reqs = [eng.submit([1, 100 + i], max_tokens=n_tokens, ignore_eos=True) for i in range(streams)]
    n = sum(r.result().completion_tokens for r in reqs)
    return n / (time.perf_counter() - t)


def prompt_rate(eng: Engine, n: int = 512) -> float:
    ids = [100 + i % 1000 for i in range(n)]
    eng.generate([200 + i for i in range(16)], max_tokens=1)  # warm-up; shares no prefix with `ids`
    t = time.perf_counter()
    eng.generate(ids, max_tokens=1, ignore_eos=True)
    return n / (time.perf_counter() - t)


def engine_figures(eng: Engine, n_tokens: int, log, label: str) -> dict:
    fig = {}
    for streams in (1, 8):
        fig[f"decode_{streams}"] = decode_rate(eng, streams, n_tokens)
        log(f"      {label}: {streams} stream(s) x {n_tokens} tokens: {fig[f'decode_{streams}']:8.1f} tok/s")
    fig["prompt_512"] = prompt_rate(eng)
    log(f"      {label}: 512-token prompt: {fig['prompt_512']:8.1f} tok/s")
    return fig


def greedy_outputs(eng: Engine, prompts: list[list[int]], n_tokens: int, adapters=()) -> list[list[int]]:
    reqs = [eng.submit(p, max_tokens=n_tokens, adapters=adapters) for p in prompts]  # temperature 0: greedy
    return [r.result().token_ids for r in reqs]


def prompt_logits(eng: Engine, prompts: list[list[int]]) -> list[np.ndarray]:
    out = []
    for p in prompts:
        req = eng.submit(p, max_tokens=1, logits_all=True)
        req.result()
        out.append(np.array(req.logits()))
    return out


def compare_greedy(gpu: Engine, prompts, cpu_out, gpu_out, adapters=()) -> dict:
    """Tokens equal before the first divergence / the longer output, over all prompts; at each
    divergence, the GPU's logit margin of its own token over the CPU's (small = a near tie
    that float rounding decides, not a wrong kernel)."""
    same = total = 0
    margins = []
    for p, c, g in zip(prompts, cpu_out, gpu_out):
        k = next((i for i, (a, b) in enumerate(zip(c, g)) if a != b), min(len(c), len(g)))
        same += k
        total += max(len(c), len(g))
        if k < min(len(c), len(g)):
            req = gpu.submit(list(p) + list(c[:k]), max_tokens=1, logits_all=True, adapters=adapters)
            req.result()
            row = req.logits()[-1]
            margins.append(float(row[g[k]] - row[c[k]]))
    return {"match": same / max(total, 1), "tokens_equal": same, "tokens": total,
            "divergences": len(margins), "divergence_margins": margins}


def compare_logits(cpu: list[np.ndarray], gpu: list[np.ndarray]) -> dict:
    diff = max(float(np.abs(a - b).max()) for a, b in zip(cpu, gpu))
    spread = float(np.mean([a.std() for a in cpu]))
    top1 = np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(cpu, gpu)]))
    return {"max_abs_diff": diff, "logit_std": spread, "max_abs_diff_over_std": diff / spread,
            "top1_agreement": float(top1)}


def training_examples(n: int) -> list[dict]:
    from .train import dataset, messages  # the train bench's routing task: byllm-shaped prompts

    return [{"messages": messages(t), "completion": json.dumps({"schema_object_wrapper": y}, separators=(",", ":"))}
            for t, y in dataset(n, seed=0)]


def time_training(path: str, device: str, steps: int, out: Path, log, **config) -> tuple[dict, Path]:
    """Seconds per step of `steps` steps (a 2-step run first warms the device up: allocator,
    cuBLAS handles, kernels), the losses; and the GGUF adapter the measured run wrote."""
    from ..learn.trainer import TrainConfig, train

    cfg = TrainConfig(epochs=1, min_steps=0, max_epochs=1, batch_size=BATCH, device=device, **config)
    train(path, training_examples(2 * BATCH), cfg, out / "warmup", progress=False)
    res = train(path, training_examples(steps * BATCH), cfg, out / "measured", progress=False)
    per_step = res.seconds / res.steps
    log(f"      {device}{' ' + str(config) if config else ''}: {res.steps} steps, {per_step * 1000:.0f} ms/step, "
        f"{res.tokens_per_second:.0f} tok/s, loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f}")
    return {"s_per_step": per_step, "steps": res.steps, "tok_s": res.tokens_per_second, "losses": res.losses}, \
        res.gguf_path


def bench_model(workdir: Path, log) -> tuple[str, dict]:
    """The random-weight GGUF and where its skeleton came from."""
    source = os.environ.get(SKELETON_ENV)
    if source:
        skeleton = skeleton_models.read_skeleton(source)
    else:
        real = models.resolve(None)
        skeleton = skeleton_models.read_skeleton(skeleton_models.write_skeleton(real, workdir / "skeleton.json.xz"))
        source = f"{real} (read here)"
    t0 = time.perf_counter()
    path = skeleton_models.build_from_skeleton(skeleton, workdir / "smollm2-135m-random-q8_0.gguf")
    types = sorted({t["type"] for t in skeleton["tensors"]})
    log(f"[1] model: {skeleton['source']} with random weights ({len(skeleton['tensors'])} tensors, {', '.join(types)}; "
        f"{path.stat().st_size / 2**20:.0f} MiB) built in {time.perf_counter() - t0:.1f} s. "
        "Timings are the real model's (same shapes and types); outputs are noise.")
    return str(path), {"skeleton": source, "source_model": skeleton["source"], "tensor_types": types,
                       "bytes": path.stat().st_size, "weights": "random (timing only; outputs are noise)"}


class Parts:
    """What could not be measured, and why. A GPU part that fails is recorded, not raised:
    the figures measured before it still come back from a one-shot run on a lent machine."""

    def __init__(self, log):
        self.missing: list[str] = []
        self.log = log

    def lack(self, what: str) -> None:
        self.missing.append(what)

    def attempt(self, what: str, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 (reported in the result, with the traceback in the log)
            import traceback

            self.log(traceback.format_exc())
            self.missing.append(f"{what}: failed with {type(e).__name__}: {e}")
            return None


def gpu_engine_figures(path: str, n_tokens: int, prompts, cpu_greedy, cpu_logits, result: dict, parts: Parts, log):
    log(f"[4] engine, n_gpu_layers={ALL_LAYERS}")
    with LlamaLog() as llog:  # the load says how many layers went to the GPU
        gpu = Engine(path, n_ctx=2048, n_gpu_layers=ALL_LAYERS)
    with gpu:
        offloaded = llog.offloaded()
        result["gpu"]["offloaded_layers"] = offloaded
        result["gpu"]["load_log"] = [x for x in llog.lines if re.search(r"CUDA|GPU|offload|VRAM", x)][:20]
        log(f"      llama.cpp: offloaded {offloaded[0]}/{offloaded[1]} layers to the GPU" if offloaded
            else "      llama.cpp said nothing about offloading")
        if not offloaded or offloaded[0] < offloaded[1]:
            parts.lack(f"every layer on the GPU (llama.cpp offloaded {offloaded})")
        result["gpu_engine"] = engine_figures(gpu, n_tokens, log, "gpu")
        result["greedy"] = compare_greedy(gpu, prompts, cpu_greedy, greedy_outputs(gpu, prompts, 32))
        result["logits"] = compare_logits(cpu_logits, prompt_logits(gpu, prompts))
    g, lg = result["greedy"], result["logits"]
    log(f"      greedy tokens equal to the CPU's: {g['match']:.3f} ({g['tokens_equal']}/{g['tokens']}; logit margins at "
        f"the divergences {[round(m, 3) for m in g['divergence_margins']]}); prompt logits: max |diff| "
        f"{lg['max_abs_diff']:.4f} (logit std {lg['logit_std']:.2f}), top-1 agreement {lg['top1_agreement']:.3f}")


def gpu_adapter(path: str, adapter: Path, n_tokens: int, prompts, result: dict, parts: Parts, log):
    log("[6] the adapter trained on cuda, exported to GGUF, served by the GPU engine")
    example = training_examples(1)[0]
    with Engine(path, n_ctx=2048) as cpu:
        cpu_out = greedy_outputs(cpu, prompts, 32, [(cpu.load_adapter(adapter), 1.0)])
    with Engine(path, n_ctx=2048, n_gpu_layers=ALL_LAYERS) as gpu:
        a = gpu.load_adapter(adapter)
        out = gpu.generate(messages=example["messages"], max_tokens=16, adapters=[(a, 1.0)])
        base = gpu.generate(messages=example["messages"], max_tokens=16)
        rate = adapter_decode_rate(gpu, a, n_tokens)
        match = compare_greedy(gpu, prompts, cpu_out, greedy_outputs(gpu, prompts, 32, [(a, 1.0)]), [(a, 1.0)])
    result["adapter"] = {"text": out.text, "base_text": base.text, "target": example["completion"],
                         "completion_tokens": out.completion_tokens, "decode_1": rate, "greedy_vs_cpu": match}
    log(f"      with the adapter: {out.text!r} (base model: {base.text!r}; trained on {example['completion']!r}); "
        f"decode {rate:.1f} tok/s; greedy tokens equal to the CPU engine's with it: {match['match']:.3f}")
    if out.completion_tokens == 0:
        parts.lack("generation with the cuda-trained adapter on the GPU engine (no tokens)")


def adapter_decode_rate(eng: Engine, adapter: int, n_tokens: int) -> float:
    eng.generate([1, 2], max_tokens=8, ignore_eos=True, adapters=[(adapter, 1.0)])
    t = time.perf_counter()
    n = eng.generate([1, 3], max_tokens=n_tokens, ignore_eos=True, adapters=[(adapter, 1.0)]).completion_tokens
    return n / (time.perf_counter() - t)


def ratios(result: dict) -> dict:
    out = {}
    if "gpu_engine" in result:
        cpu, gpu = result["cpu"], result["gpu_engine"]
        out["gpu_decode_speedup_1"] = gpu["decode_1"] / cpu["decode_1"]
        out["gpu_decode_speedup_8"] = gpu["decode_8"] / cpu["decode_8"]
        out["gpu_prompt_speedup_512"] = gpu["prompt_512"] / cpu["prompt_512"]
    if "greedy" in result:
        out["gpu_greedy_match"] = result["greedy"]["match"]
    train = result.get("train", {})
    if "cuda" in train:
        out["gpu_train_step_speedup"] = train["cpu"]["s_per_step"] / train["cuda"]["s_per_step"]
    if "cuda_bf16" in train:
        out["gpu_train_step_speedup_bf16"] = train["cpu"]["s_per_step"] / train["cuda_bf16"]["s_per_step"]
    return out


def run(quick: bool = False, log=print) -> dict:
    import torch

    n_tokens = 64 if quick else 256
    steps = 4 if quick else TRAIN_STEPS
    workdir = Path(tempfile.mkdtemp(prefix="mtllm-gpu-bench-"))
    result: dict = {"n_tokens": n_tokens, "train_steps": steps}
    parts = Parts(log)
    try:
        path, result["model"] = bench_model(workdir, log)
        llama = llama_gpu()
        cuda = torch.cuda.is_available()
        op_offload_min = os.environ.get("GGML_OP_OFFLOAD_MIN_BATCH")
        result["gpu"] = {"llama": llama, "torch": torch.__version__, "torch_cuda": cuda,
                         "torch_device": torch.cuda.get_device_name(0) if cuda else None,
                         "llama_system_info": _engine.system_info(), "GGML_OP_OFFLOAD_MIN_BATCH": op_offload_min}
        log(f"[2] llama.cpp: GPU offload {llama['supports_gpu_offload']}, devices {llama['devices']}; "
            f"torch {torch.__version__}: CUDA {'yes, ' + result['gpu']['torch_device'] if cuda else 'no'}")
        if llama["supports_gpu_offload"] and not op_offload_min:
            log("      note: GGML_OP_OFFLOAD_MIN_BATCH is not set, so the n_gpu_layers=0 engine runs prompts of "
                "32+ tokens partly on the GPU (scripts/gpu_check.sh sets it before Python starts)")
        if not llama["supports_gpu_offload"]:
            parts.lack("the engine on a GPU: this llama.cpp has no GPU backend or sees no GPU "
                       f"(llama_supports_gpu_offload() = {llama['supports_gpu_offload']}, devices {llama['devices']})")
        if not cuda:
            parts.lack(f"training on CUDA: torch {torch.__version__} sees no CUDA device")

        log("[3] engine, n_gpu_layers=0")
        with Engine(path, n_ctx=2048) as cpu:
            prompts = [cpu.tokenize(p) for p in PROMPTS]
            result["cpu"] = engine_figures(cpu, n_tokens, log, "cpu")
            cpu_greedy = greedy_outputs(cpu, prompts, 32)
            cpu_logits = prompt_logits(cpu, prompts)
        if llama["supports_gpu_offload"]:
            parts.attempt("the engine on the GPU", lambda: gpu_engine_figures(
                path, n_tokens, prompts, cpu_greedy, cpu_logits, result, parts, log))

        log(f"[5] training: {steps} steps of {BATCH} examples, TrainConfig defaults otherwise")
        result["train"] = {}
        result["train"]["cpu"], _ = time_training(path, "cpu", steps, workdir / "cpu", log)
        adapter = None
        if cuda:
            measured = parts.attempt("training on CUDA", lambda: time_training(path, "cuda", steps, workdir / "cuda", log))
            if measured:
                result["train"]["cuda"], adapter = measured
                c, g = np.array(result["train"]["cpu"]["losses"]), np.array(result["train"]["cuda"]["losses"])
                result["train"]["loss_max_rel_diff"] = float(np.max(np.abs(c - g) / np.abs(c)))
                log(f"      losses cpu vs cuda: max relative difference {result['train']['loss_max_rel_diff']:.2e}")
                bf16 = parts.attempt("training on CUDA with bf16 autocast", lambda: time_training(
                    path, "cuda", steps, workdir / "cuda-bf16", log, bf16=None))
                if bf16:
                    result["train"]["cuda_bf16"] = bf16[0]
        if adapter is not None and llama["supports_gpu_offload"]:
            parts.attempt("the cuda-trained adapter on the GPU engine", lambda: gpu_adapter(
                path, adapter, n_tokens, prompts, result, parts, log))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["ratios"] = ratios(result)
    result["goals"] = GOALS
    result["missing"] = parts.missing
    for m in parts.missing:
        log(f"NO GPU FIGURE: {m}")
    if parts.missing:
        log(f"Only the figures above were measured; nothing was estimated. Exit status {EXIT_MISSING}.")
    result["exit_code"] = EXIT_MISSING if parts.missing else 0
    return result
