"""A GGUF file runs once in a throwaway child process before llama.cpp sees it in ours.

llama.cpp trusts its input: a model or adapter file with corrupt but well-formed
metadata (a block count of 0, expert counts on a dense model, a NaN norm epsilon,
an integer-typed LoRA tensor...) reaches a GGML_ASSERT and abort()s, at load or at
the first decode. An abort cannot be caught, and we run inside the user's program,
so it would take their program down. We cannot list every assert of every
architecture llama.cpp supports either, so instead each new file is loaded and
decoded for a few tokens in a child process first. A child that dies becomes
`ModelLoadError` / `AdapterLoadError` with what llama.cpp printed; the verdict is
cached by the file's content hash (and what else decides the code path: llama.cpp
build, CPU buffer types, offload and attention settings), so a file costs one child
process once per machine, ~0.5 s for the default model.

`MTLLM_LOCALLY_VET=0` turns vetting off (for people who vet files themselves).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from .errors import AdapterLoadError, ModelLoadError

VERDICT_VERSION = 1
_STAT_TO_HASH: dict[tuple, str] = {}


def enabled() -> bool:
    return os.environ.get("MTLLM_LOCALLY_VET", "1") != "0"


def _verdict_dir() -> Path:
    from .models import cache_dir

    return cache_dir() / "vetted"


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of the file's bytes, remembered per (inode, size, mtime) in this process."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _STAT_TO_HASH.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        digest = _STAT_TO_HASH[key] = h.hexdigest()
    return digest


def _runtime_tag(settings: dict) -> str:
    from . import _engine

    return json.dumps({"v": VERDICT_VERSION, "engine": _engine.__version__, "llama": _engine.llama_version(),
                       "cpu": _engine.system_info(), "libs": _linked_libraries(),
                       "bufts": _engine.cpu_extra_buffer_types_enabled(), **settings}, sort_keys=True)


def _linked_libraries() -> list:
    """llama.cpp's libraries as loaded (path, size, mtime): a rebuilt llama.cpp is new code."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "libllama" in line or "libggml" in line})
        return [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths if p.startswith("/")]
    except OSError:
        return []


def _timeout_s(*paths: str) -> float:
    size_gb = sum(os.path.getsize(p) for p in paths) / 1e9
    return 60.0 + 30.0 * size_gb


def _settings(n_gpu_layers: int, flash_attn: int, kv_f32: bool, use_mmap: bool, use_repack: bool) -> dict:
    out = dict(n_gpu_layers=n_gpu_layers, flash_attn=flash_attn, kv_f32=kv_f32, use_mmap=use_mmap)
    if not use_repack:  # other kernels; named only when off, so that verdicts cached before it still hold
        out["use_repack"] = False
    return out


def vet_model(path: str, *, n_gpu_layers: int = 0, flash_attn: int = 0, kv_f32: bool = False,
              use_mmap: bool = True, use_repack: bool = True) -> None:
    """Raise ModelLoadError if loading and decoding `path` crashes llama.cpp."""
    _vet(ModelLoadError, path, None, _settings(n_gpu_layers, flash_attn, kv_f32, use_mmap, use_repack))


def vet_adapter(model_path: str, adapter_path: str, *, n_gpu_layers: int = 0, flash_attn: int = 0,
                kv_f32: bool = False, use_mmap: bool = True, use_repack: bool = True) -> None:
    """Raise AdapterLoadError if loading `adapter_path` onto the model and decoding with it crashes."""
    _vet(AdapterLoadError, model_path, adapter_path, _settings(n_gpu_layers, flash_attn, kv_f32, use_mmap, use_repack))


def _vet(error: type, model_path: str, adapter_path: str | None, settings: dict) -> None:
    if not enabled():
        return
    subject = adapter_path or model_path
    key = hashlib.sha256("\0".join([
        file_digest(model_path), file_digest(adapter_path) if adapter_path else "", _runtime_tag(settings)
    ]).encode()).hexdigest()
    record = _verdict_dir() / f"{key}.json"
    try:
        verdict = json.loads(record.read_text())
    except (OSError, ValueError):
        verdict = None
    if verdict is None:
        verdict = _run_child(model_path, adapter_path, settings)
        if verdict.get("cache"):
            _write_private(record, json.dumps(verdict).encode())
    if not verdict.get("ok"):
        raise error(f"'{subject}' was rejected: {verdict.get('why', 'unknown reason')}")


# Tensor types llama.cpp can apply as LoRA matrices; integer and f64 tensors crashed it.
_LORA_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def check_adapter_file(path: str, architecture: str) -> None:
    """What we can tell from the adapter's metadata, with a clear message each."""
    import gguf

    def bad(why: str):
        raise AdapterLoadError(f"adapter file '{path}' {why}")

    try:
        _check_adapter_fields(gguf.GGUFReader(path), architecture, bad)
    except AdapterLoadError:
        raise
    except Exception as e:  # gguf-py raises many kinds on a corrupt file
        bad(f"is not a readable GGUF file: {type(e).__name__}: {e}")


def _check_adapter_fields(reader, architecture: str, bad) -> None:
    import math

    import numpy as np

    def scalar(key: str):
        field = reader.fields.get(key)
        if field is None:
            return None
        if len(field.types) != 1:
            bad(f"has '{key}' stored as an array; a single value is required")
        value = field.contents()
        return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value

    if scalar("general.type") != "adapter" or scalar("adapter.type") != "lora":
        bad("is not a LoRA adapter (general.type must be 'adapter' and adapter.type 'lora')")
    arch = scalar("general.architecture")
    if arch != architecture:
        bad(f"was made for architecture {arch!r}; the model is {architecture!r}")
    alpha = scalar("adapter.lora.alpha")
    if alpha is not None and (isinstance(alpha, str) or not isinstance(alpha, (int, float, np.number))
                              or not math.isfinite(float(alpha))):
        bad(f"has adapter.lora.alpha = {alpha!r}; a finite number is required")
    names = set()
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in _LORA_TYPES:
            bad(f"has tensor '{t.name}' of type {kind}; LoRA tensors must be one of {', '.join(_LORA_TYPES)}")
        if len(t.shape) != 2 or min(int(d) for d in t.shape) < 1:
            bad(f"has tensor '{t.name}' of shape {list(map(int, t.shape))}; LoRA tensors are 2-D matrices")
        if not (t.name.endswith(".lora_a") or t.name.endswith(".lora_b")):
            bad(f"has tensor '{t.name}' that is neither a .lora_a nor a .lora_b matrix")
        names.add(t.name)
    if not names:
        bad("has no LoRA tensors")
    for n in names:
        partner = n[:-1] + ("b" if n.endswith("a") else "a")
        if partner not in names:
            bad(f"has '{n}' without its partner '{partner}'")


def _write_private(path: Path, data: bytes) -> None:
    """Atomic, owner-only (verdicts name the user's files); a cache we cannot write is
    only a cache: the next engine vets again."""
    import tempfile

    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        pass


def _run_child(model_path: str, adapter_path: str | None, settings: dict) -> dict:
    args = json.dumps({"model": model_path, "adapter": adapter_path, **settings})
    # GGML_NO_BACKTRACE: on abort, ggml would otherwise attach gdb to print a backtrace.
    # PYTHONPATH: the child imports this very package, wherever it was imported from.
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, MTLLM_LOCALLY_VET="0", GGML_NO_BACKTRACE="1",
               PYTHONPATH=os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    try:
        proc = subprocess.run([sys.executable, "-m", "mtllm_locally.vetting", args], env=env, capture_output=True,
                              timeout=_timeout_s(model_path, *([adapter_path] if adapter_path else [])))
    except subprocess.TimeoutExpired:
        # Not cached: a slow disk is not a verdict on the file.
        return {"ok": False, "cache": False, "why": "llama.cpp did not finish loading it in a child process in time"}
    out = proc.stdout.decode("utf-8", "replace")
    if proc.returncode == 0 and DONE in out:
        return {"ok": True, "cache": True}
    if proc.returncode == 0 and CLEAN in out:
        # llama.cpp refused it with an error of its own: the same error comes back
        # in-process, and nothing is cached (the engine's settings may differ).
        return {"ok": True}
    lines = [ln.strip() for ln in proc.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    telling = [ln for ln in lines if any(w in ln for w in ("GGML_ASSERT", "GGML_ABORT", "error", "terminate"))]
    tail = re.sub(r"\S*/(?=[^/\s]+:\d+:)", "", " | ".join((telling or lines)[-3:]))  # file:line, no build paths
    # Only what the file did to llama.cpp is remembered; a child killed for memory or
    # failing to start says nothing about the file and is tried again next time.
    crash = -proc.returncode in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL)
    if proc.returncode < 0:
        try:
            how = signal.Signals(-proc.returncode).name
        except ValueError:
            how = f"signal {-proc.returncode}"
        why = f"llama.cpp crashed ({how}) loading or running it in a child process"
    else:
        why = f"the vetting process failed with exit code {proc.returncode}"
    return {"ok": False, "cache": crash, "why": why + (f": {tail[-600:]}" if tail else "")}


DONE, CLEAN = "mtllm-vetting: decoded", "mtllm-vetting: refused cleanly"


def _child(spec: dict) -> int:
    """Load the model (and adapter) as the engine does, then decode what serving does:
    a batch of two prompts, one of them a 130-token prefill, then a prompt that reuses
    a cached prefix. A clean error from llama.cpp is reported as such."""
    from . import _engine
    from .errors import MtllmError

    try:
        mp = _engine.ModelParams()
        mp.n_gpu_layers = spec["n_gpu_layers"]
        mp.use_mmap = spec["use_mmap"]
        mp.use_repack = spec.get("use_repack", True)
        model = _engine.Model(spec["model"], mp)
        ep = _engine.EngineParams()
        ep.n_ctx, ep.n_batch, ep.max_running, ep.cache_sequences = 256, 128, 2, 1
        ep.flash_attn, ep.kv_f32 = spec["flash_attn"], spec["kv_f32"]
        engine = _engine.Engine(model, ep)
        adapters = [(engine.load_adapter(spec["adapter"]), 1.0)] if spec["adapter"] else []
        text = model.tokenize("The quick brown fox jumps over the lazy dog. " * 20, True, False)
        ids = (text if len(text) >= 8 else [i % max(1, model.n_vocab) for i in range(8)]) * 130
        long, short = ids[:130], ids[:9]
        sp = _engine.SamplingParams()
        sp.max_tokens, sp.ignore_eos = 3, True
        for batch in ([long, short], [long[:40] + short]):
            reqs = [engine.submit(p, sp, adapters) for p in batch]
            for r in reqs:
                while not r.take(-1)[2]:
                    pass
        engine.close()
    except MtllmError as e:
        print(CLEAN, type(e).__name__, flush=True)
        return 0
    print(DONE, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(json.loads(sys.argv[1])))
