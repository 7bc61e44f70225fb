"""The engine runs inside the user's program: nothing we are handed may end it.

Crashes are observed from child processes (a segfault or abort there is a failed
test here, not a dead test run)."""

import json
import math
import os
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest

from mtllm_locally import (AdapterLoadError, ContextOverflowError, Engine, InvalidRequestError, ModelLoadError,
                           _engine, cpu_backend)
from tiny_llama import TinyConfig, build_tiny_llama, build_tiny_lora


def run_child(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def rewrite_gguf(src, dst, *, kv: dict | None = None, drop: tuple = (), tensor_fn=None):
    """Copy a GGUF, replacing metadata values (key -> (value, GGUFValueType)) and tensors."""
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    kv = kv or {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in kv or key in drop:
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), vtype, sub_type=field.types[1])
        else:
            writer.add_key_value(key, field.contents(), vtype)
    for key, (value, vtype) in kv.items():
        writer.add_key_value(key, value, vtype)
    for t in reader.tensors:
        arr = np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) if t.tensor_type == gguf.GGMLQuantizationType.F32 else np.array(t.data)
        if tensor_fn:
            arr = tensor_fn(t.name, arr)
            if arr is None:
                continue
        writer.add_tensor(t.name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(dst)


# ------------------------------------------------------------------ CPU buffer types (AMX)

def test_amx_policy_is_decided_the_same_on_every_machine():
    assert cpu_backend.allowed(["AMX", "CPU_REPACK"], allow_amx=False) == ["CPU_REPACK"]
    assert cpu_backend.allowed(["AMX", "CPU_REPACK"], allow_amx=True) == ["AMX", "CPU_REPACK"]
    assert cpu_backend.allowed(["KLEIDIAI", "CPU_REPACK"], allow_amx=False) == ["KLEIDIAI", "CPU_REPACK"]


def test_amx_is_never_enabled_by_default_and_the_rest_is_kept():
    report = cpu_backend.report()
    assert "AMX" not in report["enabled"]
    assert report["enabled"] == [n for n in report["available"] if n != "AMX"]
    if "AMX" in report["available"]:
        assert "AMX" in report["refused"]


def test_default_model_decodes_a_batch_with_the_machines_buffer_types():
    # The regression guard for llama.cpp #20824: on an AMX machine this child died of
    # SIGSEGV at its first multi-token prompt. It runs whatever this machine offers.
    out = run_child("""
        import json
        from mtllm_locally import Engine, cpu_backend
        with Engine(n_ctx=512) as eng:
            reqs = [eng.submit("Write a short sentence about the sea number %d." % i, max_tokens=8) for i in range(4)]
            texts = [r.result().text for r in reqs]
        print(json.dumps({"report": cpu_backend.report(), "texts": texts}))
    """)
    assert out.returncode == 0, f"child died ({out.returncode}): {out.stderr[-2000:]}"
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(t for t in result["texts"])


# ------------------------------------------------------------------ bad model and adapter files

@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("safety") / "tiny.gguf"
    return str(path), build_tiny_llama(path, TinyConfig())


U32 = gguf.GGUFValueType.UINT32
F32 = gguf.GGUFValueType.FLOAT32
STR = gguf.GGUFValueType.STRING


@pytest.mark.parametrize("name,kv", [
    ("block_count_0", {"llama.block_count": (0, U32)}),
    ("block_count_too_big", {"llama.block_count": (7, U32)}),
    ("experts_on_dense", {"llama.expert_count": (4, U32), "llama.expert_used_count": (2, U32)}),
    ("unknown_rope_scaling", {"llama.rope.scaling.type": ("sideways", STR)}),
    ("nan_norm_eps", {"llama.attention.layer_norm_rms_epsilon": (float("nan"), F32)}),
    ("negative_norm_eps", {"llama.attention.layer_norm_rms_epsilon": (-1.0, F32)}),
    ("head_count_0", {"llama.attention.head_count": (0, U32)}),
])
def test_corrupt_model_metadata_is_a_clean_error(tmp_path, tiny_weights, name, kv):
    bad = rewrite_gguf(tiny_weights[0], tmp_path / f"{name}.gguf", kv=kv)
    out = run_child(f"""
        import sys
        from mtllm_locally import Engine, MtllmError
        try:
            with Engine({bad!r}, n_ctx=64) as eng:
                eng.generate("hello there", max_tokens=2)
            print("served")
        except MtllmError as e:
            print("error", type(e).__name__, e)
        with Engine({tiny_weights[0]!r}, n_ctx=64) as eng:  # the process goes on serving
            eng.generate("hello there", max_tokens=2)
        print("alive")
    """)
    assert out.returncode == 0, f"{name}: child died ({out.returncode}): {out.stderr[-1500:]}"
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "alive"
    assert lines[0] == "served" or lines[0].startswith("error ModelLoadError"), lines


def test_model_that_aborts_llama_cpp_is_rejected_and_the_verdict_cached(tmp_path, tiny_weights, monkeypatch):
    monkeypatch.setenv("MTLLM_LOCALLY_HOME", str(tmp_path / "home"))
    # A NaN norm epsilon loads fine and aborts at the first decode (GGML_ASSERT(eps >= 0)).
    bad = rewrite_gguf(tiny_weights[0], tmp_path / "nan-eps.gguf",
                       kv={"llama.attention.layer_norm_rms_epsilon": (float("nan"), F32)})
    from mtllm_locally import vetting

    with pytest.raises(ModelLoadError, match=r"crashed \(SIGABRT\).*GGML_ASSERT"):
        vetting.vet_model(bad)
    verdicts = list((tmp_path / "home" / "vetted").glob("*.json"))
    assert len(verdicts) == 1 and oct(verdicts[0].stat().st_mode & 0o777) == "0o600"
    monkeypatch.setattr(vetting, "_run_child", lambda *a: pytest.fail("the cached verdict was not used"))
    with pytest.raises(ModelLoadError, match="crashed"):
        vetting.vet_model(bad)


def test_a_clean_refusal_is_not_cached_and_comes_back_in_process(tmp_path, tiny_weights, monkeypatch):
    monkeypatch.setenv("MTLLM_LOCALLY_HOME", str(tmp_path / "home"))
    bad = rewrite_gguf(tiny_weights[0], tmp_path / "experts.gguf",
                       kv={"llama.expert_count": (4, U32), "llama.expert_used_count": (2, U32)})
    with pytest.raises(ModelLoadError, match="cannot load GGUF model"):
        Engine(bad, n_ctx=64)
    assert not list((tmp_path / "home" / "vetted").glob("*.json"))


@pytest.mark.parametrize("mutation", ["int_tensor", "f64_tensor", "3d_tensor", "alpha_string", "alpha_array",
                                      "alpha_nan", "missing_partner", "other_arch"])
def test_bad_adapter_files_are_refused_with_a_reason(tmp_path, tiny_weights, tiny_engine, mutation):
    path, weights = tiny_weights
    good = tmp_path / "good.gguf"
    build_tiny_lora(good, weights, TinyConfig(), architecture="llama" if mutation != "other_arch" else "qwen2")
    kv, tensor_fn = {}, None
    if mutation == "int_tensor":
        tensor_fn = lambda n, a: a.astype(np.int32) if n.endswith("attn_q.weight.lora_a") else a
    elif mutation == "f64_tensor":
        tensor_fn = lambda n, a: a.astype(np.float64) if n.endswith("attn_q.weight.lora_a") else a
    elif mutation == "3d_tensor":
        tensor_fn = lambda n, a: a.reshape(1, *a.shape) if n.endswith("attn_q.weight.lora_a") else a
    elif mutation == "alpha_string":
        kv = {"adapter.lora.alpha": ("8", STR)}
    elif mutation == "alpha_array":
        kv = {"adapter.lora.alpha": ([8.0, 9.0], gguf.GGUFValueType.ARRAY)}
    elif mutation == "alpha_nan":
        kv = {"adapter.lora.alpha": (float("nan"), F32)}
    elif mutation == "missing_partner":
        tensor_fn = lambda n, a: None if n == "blk.0.attn_q.weight.lora_b" else a
    bad = rewrite_gguf(good, tmp_path / "bad.gguf", kv=kv, tensor_fn=tensor_fn) if (kv or tensor_fn) else str(good)
    eng = Engine(path, flash_attn=False, n_ctx=128)
    try:
        with pytest.raises(AdapterLoadError):
            eng.load_adapter(bad)
        assert eng.generate("hello", max_tokens=3).completion_tokens == 3  # still serving
    finally:
        eng.close()


# ------------------------------------------------------------------ parameters

def test_huge_repeat_window_and_top_k_are_clamped_not_fatal(tiny_engine):
    out = tiny_engine.generate("hello world", max_tokens=4, repeat_penalty=1.1, repeat_last_n=2**31 - 1,
                               top_k=2**31 - 1, temperature=0.8, seed=3)
    assert out.completion_tokens == 4


@pytest.mark.parametrize("kw", [
    dict(repeat_last_n=2**31), dict(max_tokens=2**40), dict(stop=["x"] * 65), dict(stop=["x" * 2000]),
    dict(temperature=float("nan")), dict(top_p=float("inf")),
])
def test_out_of_range_sampling_is_invalid_request(tiny_engine, kw):
    with pytest.raises(InvalidRequestError):
        tiny_engine.generate("hello", **kw)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 1e9, "1.0", None])
def test_bad_adapter_scales_are_refused(tiny_engine, tmp_path, tiny_weights, scale):
    adapter = tmp_path / "a.gguf"
    build_tiny_lora(adapter, tiny_weights[1], TinyConfig())
    # The tiny_engine fixture's model has the same config and seed, so the adapter fits it.
    aid = tiny_engine.load_adapter(adapter)
    try:
        with pytest.raises(InvalidRequestError):
            tiny_engine.generate("hello", max_tokens=2, adapters=[(aid, scale)])
    finally:
        tiny_engine.unload_adapter(aid)


# ------------------------------------------------------------------ grammars

def test_deep_chained_grammar_is_an_error_or_works_never_a_crash(tiny_model_path):
    out = run_child(f"""
        from mtllm_locally import Engine, MtllmError
        from mtllm_locally.constraints import Grammar
        n = 4000
        rules = ["start: r0"] + [f"r{{i}}: r{{i+1}} \\"a\\"" for i in range(n)] + [f"r{{n}}: \\"b\\""]
        with Engine({tiny_model_path!r}, n_ctx=256) as eng:
            try:
                eng.generate("x", max_tokens=4, grammar=Grammar("lark", "\\n".join(rules)))
                print("ran")
            except MtllmError as e:
                print("error", type(e).__name__)
            print(eng.generate("hello", max_tokens=2).completion_tokens)
    """)
    assert out.returncode == 0, f"child died ({out.returncode}): {out.stderr[-1500:]}"
    assert out.stdout.strip().splitlines()[-1] == "2"


def test_oversized_grammar_is_refused(tiny_engine):
    from mtllm_locally.constraints import Grammar

    with pytest.raises(InvalidRequestError):
        tiny_engine.generate("x", max_tokens=2, grammar=Grammar("regex", "a" * (_engine.limits["max_grammar_bytes"] + 1)))


# ------------------------------------------------------------------ KV pressure

def test_requests_that_cannot_run_together_all_finish(tiny_model_path):
    # Each fits alone, none together: this spun at 100% CPU forever, preempting and
    # re-admitting the newest request without any request ever finishing.
    eng = Engine(tiny_model_path, n_ctx=256, max_running=4, cache_sequences=0, flash_attn=False)
    try:
        prompt = list(range(100, 140))
        reqs = [eng.submit(prompt, max_tokens=200, ignore_eos=True) for _ in range(4)]
        outs = [r.result(timeout=120) for r in reqs]
        assert all(o.completion_tokens == 200 and o.finish_reason == "length" for o in outs)
        assert eng.stats()["preemptions"] > 0
    finally:
        eng.close()


def test_prompts_near_and_over_the_context_end_cleanly(tiny_model_path):
    # n_ctx=64 makes llama.cpp cap its batch below our default n_batch (512): a step of
    # the whole prompt was a GGML_ASSERT that aborted the process.
    eng = Engine(tiny_model_path, n_ctx=64, max_running=2, cache_sequences=0, flash_attn=False)
    try:
        n = eng.n_ctx
        with pytest.raises(ContextOverflowError):
            eng.generate([100] * n, max_tokens=4)
        near = [eng.submit([101 + i % 50 for i in range(n - 5)], max_tokens=100, ignore_eos=True) for _ in range(2)]
        outs = [r.result(timeout=60) for r in near]
        assert all(o.finish_reason in ("length",) and o.completion_tokens <= 5 for o in outs)
        assert eng.generate(list(range(100, 110)), max_tokens=4).completion_tokens == 4
    finally:
        eng.close()
