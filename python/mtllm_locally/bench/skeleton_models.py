"""A real model's shapes with random weights: what speed depends on, without the file.

A skeleton is a GGUF's metadata (every key/value: architecture, hyperparameters, the real
tokenizer and chat template) and its tensors' names, shapes and types, without their data:
~0.5 MB for SmolLM2-135M, whose Q8_0 weights are 145 MB, too much to send to a lent GPU
machine. `build_from_skeleton` writes a GGUF with the same metadata, tensor names, shapes
and types, and random weights. llama.cpp's speed and the trainer's depend only on those, so
timings on it are the real model's; its outputs are noise (both backends' same noise, which
is what a CPU-vs-GPU comparison needs).

    write_skeleton(models.resolve(None), "smollm2.skeleton.json.xz")   # here, from the real file
    build_from_skeleton("smollm2.skeleton.json.xz", "smollm2-random.gguf")   # there
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import gguf
import numpy as np

FORMAT = "mtllm-gguf-skeleton/1"


def write_skeleton(src: str | Path, dst: str | Path) -> Path:
    """Metadata and tensor layout of the GGUF at `src`, as xz-compressed JSON at `dst`."""
    reader = gguf.GGUFReader(str(src))
    kv = []
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):  # the header's counts, not key/values
            continue
        vtype = gguf.GGUFValueType(f.types[0])
        sub = gguf.GGUFValueType(f.types[1]).name if vtype == gguf.GGUFValueType.ARRAY else None
        kv.append({"key": key, "type": vtype.name, "sub_type": sub, "value": f.contents()})
    tensors = [{"name": t.name, "shape": [int(d) for d in t.shape], "type": t.tensor_type.name} for t in reader.tensors]
    dst = Path(dst)
    with lzma.open(dst, "wt", encoding="utf-8") as out:
        json.dump({"format": FORMAT, "source": Path(src).name, "kv": kv, "tensors": tensors}, out)
    return dst


def read_skeleton(path: str | Path) -> dict:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        skeleton = json.load(f)
    if skeleton.get("format") != FORMAT:
        raise ValueError(f"{path} is not a model skeleton ({FORMAT})")
    return skeleton


def _random_weights(name: str, rows: int, cols: int, tied: bool, rng: np.random.Generator) -> np.ndarray:
    """Weights that keep a random model numerically sane: norms 1, each matrix scaled by
    1/sqrt(its input width) so every projection keeps the scale of what it reads. Tied
    embeddings (SmolLM2's) are also the output: std 0.2 there spreads the logits (std ~5 on
    SmolLM2) so greedy argmax has clear winners and a CPU/GPU comparison is not decided by
    float ties among 49k near-equal logits."""
    if rows == 1:  # a vector (every norm of a Llama-style model)
        return np.ones(cols, dtype=np.float32)
    std = 0.2 if name == "token_embd.weight" and tied else 1.0 / np.sqrt(cols)
    return (rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(std))


def build_from_skeleton(skeleton: str | Path | dict, dst: str | Path, seed: int = 0) -> Path:
    """A GGUF at `dst` with the skeleton's metadata and tensor layout and random weights
    (deterministic for a seed). Quantized types are quantized by gguf-py, as a converter would."""
    sk = skeleton if isinstance(skeleton, dict) else read_skeleton(skeleton)
    kv = {e["key"]: e for e in sk["kv"]}
    arch = kv["general.architecture"]["value"]
    writer = gguf.GGUFWriter(str(dst), arch)  # writes general.architecture itself
    for key, e in kv.items():
        if key == "general.architecture":
            continue
        value = f"{e['value']} (random weights)" if key == "general.name" else e["value"]
        sub = gguf.GGUFValueType[e["sub_type"]] if e["sub_type"] else None
        writer.add_key_value(key, value, gguf.GGUFValueType[e["type"]], sub_type=sub)
    names = {t["name"] for t in sk["tensors"]}
    tied = "output.weight" not in names
    rng = np.random.default_rng(seed)
    for t in sk["tensors"]:
        cols, rows = t["shape"][0], int(np.prod(t["shape"][1:], dtype=np.int64))  # GGUF order: ne0 is the row
        qtype = gguf.GGMLQuantizationType[t["type"]]
        data = _random_weights(t["name"], rows, cols, tied, rng).reshape(tuple(reversed(t["shape"])))
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(t["name"], data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(t["name"], data.astype(np.float16))
        else:
            writer.add_tensor(t["name"], gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(dst)
