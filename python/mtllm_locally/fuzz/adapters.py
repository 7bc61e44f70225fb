"""LoRA adapter files and scales: the valid tiny adapter with one or two mutations.

An adapter is loaded into the child's running engine (where a crash would take the
host program down with every request in flight), then, if accepted, used by a request
at a fuzzed scale and unloaded. It may only be refused with AdapterLoadError, and a
bad scale only with InvalidRequestError.
"""

from __future__ import annotations

import copy
import functools
import random

import numpy as np

from . import gguf_file as g
from .context import DRIVES, HELLO, drive
from .model_files import b_flip, b_truncate, m_counts, m_lying_lengths, m_version
from .tiny import tiny_lora

NAN, INF = float("nan"), float("inf")
SCALES = (1.0, 0.0, -1.0, 0.5, NAN, INF, -INF, 1e30, -1e30, 1e-30, 3.4e38, 1e308)


@functools.lru_cache(maxsize=1)
def _base() -> g.GGUF:
    return tiny_lora()


def base_adapter() -> g.GGUF:
    return copy.deepcopy(_base())


def a_dtype(f, r):
    ts = [t for t in f.tensors] if r.random() < 0.3 else [r.choice(f.tensors)]
    new = r.choice(("I8", "I16", "I32", "I64", "F64", "F16", "BF16", "Q8_0", "Q4_0"))
    tid, size, block = g.GGML_TYPES[new]
    for t in ts:
        t.ggml_type = tid
        t.data = (t.data * 3)[: g.tensor_nbytes(tid, t.ne)] if t.ne[0] % block == 0 else t.data
    return "tensor_dtype", f"{'every tensor' if len(ts) > 1 else ts[0].name} stored as {new}"


def a_rank(f, r):
    t = r.choice(f.tensors)
    how = r.choice(("3d", "0d", "1d", "4d"))
    old = list(t.ne)
    if how == "3d":
        t.ne = t.ne + [r.choice((1, 2))]
    elif how == "4d":
        t.ne = t.ne + [1, 1]
    elif how == "0d":
        t.ne = []
    else:
        t.ne = [int(np.prod(t.ne))]
    t.data = (t.data * 2)[: g.tensor_nbytes(t.ggml_type, t.ne)]
    return "tensor_rank", f"{t.name} {old} -> {t.ne} ({how})"


def a_shape(f, r):
    t = r.choice(f.tensors)
    old = list(t.ne)
    how = r.choice(("transpose", "n_in+1", "rank 0", "rank 4096", "rank mismatch", "huge"))
    if how == "transpose":
        t.ne = list(reversed(t.ne))
    elif how == "n_in+1":
        t.ne = [t.ne[0] + 1] + t.ne[1:]
    elif how == "rank 0":
        t.ne = [t.ne[0], 0] if t.name.endswith("lora_a") else [0, t.ne[1]]
    elif how == "rank 4096":
        t.ne = [t.ne[0], 4096] if t.name.endswith("lora_a") else [4096, t.ne[1]]
    elif how == "rank mismatch":
        t.ne = [t.ne[0], t.ne[1] + 1] if t.name.endswith("lora_a") else [t.ne[0] + 1, t.ne[1]]
    else:
        t.ne = [t.ne[0], 2**31] if t.name.endswith("lora_a") else [2**31, t.ne[1]]
    if how != "huge":
        t.data = (t.data * 4096)[: g.tensor_nbytes(t.ggml_type, t.ne)] if t.data else b""
    return "tensor_shape", f"{t.name} {old} -> {t.ne} ({how})"


def a_alpha(f, r):
    how = r.choice(("string", "array", "nan", "inf", "-inf", "negative", "zero", "huge", "u32", "bool", "f64",
                    "missing", "empty array"))
    key = "adapter.lora.alpha"
    if how == "string":
        f.set(key, g.STR, "8.0")
    elif how == "array":
        f.set(key, g.ARR, [8.0, 16.0], g.F32)
    elif how == "empty array":
        f.set(key, g.ARR, [], g.F32)
    elif how == "u32":
        f.set(key, g.U32, 8)
    elif how == "bool":
        f.set(key, g.BOOL, True)
    elif how == "f64":
        f.set(key, g.F64, 8.0)
    elif how == "missing":
        f.drop(key)
    else:
        f.set(key, g.F32, {"nan": NAN, "inf": INF, "-inf": -INF, "negative": -8.0, "zero": 0.0, "huge": 3e38}[how])
    return "alpha", f"adapter.lora.alpha: {how}"


def a_meta(f, r):
    key, vtype, value = r.choice((
        ("general.architecture", g.STR, "qwen2"), ("general.architecture", g.STR, "gemma3"),
        ("general.architecture", g.STR, "phi3"), ("general.architecture", g.STR, ""),
        ("general.architecture", g.STR, "bogus"), ("general.architecture", g.U32, 5),
        ("general.type", g.STR, "model"), ("general.type", g.U32, 1), ("adapter.type", g.STR, "ia3"),
        ("adapter.type", g.STR, "bogus"), ("adapter.type", g.STR, "alora"),
        ("adapter.alora.invocation_tokens", g.ARR, [49152, 2**32 - 1, 0]),
        ("adapter.alora.invocation_tokens", g.ARR, list(range(5000))),
        ("adapter.alora.invocation_tokens", g.STR, "tokens"), ("adapter.alora.invocation_tokens", g.ARR, []),
    ))
    if r.random() < 0.25 and key != "adapter.alora.invocation_tokens":
        f.drop(key)
        return "metadata", f"{key} removed"
    f.set(key, vtype, value, g.U32 if vtype == g.ARR else None)
    return "metadata", f"{key}={str(value)[:40]}"


def a_names(f, r):
    how = r.choice(("unknown layer", "embedding", "output", "foo", "lora_c", "a without b", "duplicate", "empty",
                    "norm"))
    t = r.choice(f.tensors)
    if how == "a without b":
        f.tensors = [x for x in f.tensors if not str(x.name).endswith("lora_b")]
        return "tensor_names", "lora_a tensors without their lora_b"
    if how == "duplicate":
        f.tensors.append(copy.copy(t))
        return "tensor_names", f"{t.name} twice"
    if how == "empty":
        f.tensors = []
        return "tensor_names", "no tensors at all"
    new_base = {"unknown layer": "blk.99.attn_q.weight", "embedding": "token_embd.weight",
                "output": "output.weight", "foo": "foo", "norm": "blk.0.attn_norm.weight"}
    if how == "lora_c":
        t.name = str(t.name).rsplit(".", 1)[0] + ".lora_c"
        return "tensor_names", f"a tensor named {t.name}"
    stem = new_base[how]
    a = next(x for x in f.tensors if x.name == str(t.name).rsplit(".", 1)[0] + ".lora_a")
    b = next(x for x in f.tensors if x.name == str(t.name).rsplit(".", 1)[0] + ".lora_b")
    a.name, b.name = stem + ".lora_a", stem + ".lora_b"
    return "tensor_names", f"a pair renamed to {stem}.lora_a/b (the model {'lacks it' if how != 'norm' else 'has a 1-D norm there'})"


def a_values(f, r):
    t = r.choice(f.tensors)
    v = r.choice((NAN, INF, -INF, 3e38))
    t.data = np.full(len(t.data) // 4, v, dtype=np.float32).tobytes()
    return "tensor_values", f"{t.name} filled with {v}"


MUTATIONS = (a_dtype, a_dtype, a_rank, a_rank, a_shape, a_shape, a_alpha, a_alpha, a_meta, a_names, a_values,
             m_version, m_counts, m_lying_lengths)


def make(r: random.Random):
    f = base_adapter()
    if r.random() < 0.15:
        data = f.to_bytes()
        data, label, desc = r.choice((b_truncate, b_flip))(data, f, r)
    else:
        labels, descs = [], []
        for _ in range(1 if r.random() < 0.75 else 2):
            try:
                label, desc = r.choice(MUTATIONS)(f, r)
            except (IndexError, StopIteration):  # an earlier mutation removed what this one edits
                continue
            labels.append(label)
            descs.append(desc)
        data, label, desc = f.to_bytes(), "+".join(labels) or "unmutated", "; ".join(descs) or "the valid adapter"
    scale = r.choice(SCALES)
    how = r.choice(DRIVES)
    unload_twice = r.random() < 0.2

    def run(ctx):
        path = ctx.path()
        with open(path, "wb") as fh:
            fh.write(data)
        eng = ctx.shared_engine()
        aid = eng.load_adapter(path)
        try:
            drive(eng, how, messages=HELLO, max_tokens=4, adapters=[(aid, scale)])
        finally:
            eng.unload_adapter(aid)
        if unload_twice:
            eng.unload_adapter(aid)

    return label, f"{desc}; if loaded: {how} at scale {scale}" + ("; unloaded twice" if unload_twice else ""), run

