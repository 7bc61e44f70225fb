"""bench/skeleton_models.py: a model rebuilt from its skeleton (metadata and tensor layout,
no weights) has the original's metadata, tensor names, shapes and types, and runs."""

import gguf
import numpy as np

from mtllm_locally import Engine
from mtllm_locally.bench.skeleton_models import build_from_skeleton, read_skeleton, write_skeleton


def fields(path):
    r = gguf.GGUFReader(str(path))
    return {k: (f.types, f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}


def test_a_model_rebuilt_from_its_skeleton_keeps_metadata_and_layout_and_runs(tiny_model_path, tmp_path):
    skeleton = read_skeleton(write_skeleton(tiny_model_path, tmp_path / "tiny.skeleton.json.xz"))
    for t in skeleton["tensors"]:  # quantized matrices, as in the served layout
        if len(t["shape"]) == 2:
            t["type"] = "Q8_0"
    path = build_from_skeleton(skeleton, tmp_path / "tiny-random.gguf")

    before, after = fields(tiny_model_path), fields(path)
    assert before.keys() == after.keys()
    assert [k for k in before if before[k] != after[k]] == ["general.name"]
    assert after["general.name"][1].endswith("(random weights)")
    src = {t.name: (t.shape.tolist(), t.tensor_type.name) for t in gguf.GGUFReader(tiny_model_path).tensors}
    new = {t.name: (t.shape.tolist(), t.tensor_type.name) for t in gguf.GGUFReader(str(path)).tensors}
    assert src.keys() == new.keys()
    assert all(new[n][0] == src[n][0] and new[n][1] == ("Q8_0" if len(src[n][0]) == 2 else "F32") for n in src)

    with Engine(str(path), n_ctx=256) as eng:
        out = eng.generate("Hello there", max_tokens=6, ignore_eos=True)
        req = eng.submit("Hello there", max_tokens=1, logits_all=True)
        req.result()
        logits = req.logits()
    assert out.completion_tokens == 6
    assert np.isfinite(logits).all() and logits.std() > 0.1  # sane numbers, not a flat or exploding model
    assert build_from_skeleton(skeleton, tmp_path / "again.gguf").read_bytes() == path.read_bytes()  # seeded
