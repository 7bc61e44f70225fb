"""LoRA training on the served GGUF base, and its two export formats.

The parity tests close the loop the engine's adapter tests opened: an adapter
trained in torch, exported to GGUF, and loaded by llama.cpp computes the same
logits as the torch PEFT model it came from."""

import json
import threading

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from mtllm_locally import Engine, InvalidRequestError, models  # noqa: E402
from mtllm_locally.learn import export  # noqa: E402
from mtllm_locally.learn.torch_model import load_model, read_config  # noqa: E402
from mtllm_locally.learn.trainer import (  # noqa: E402
    CHECKPOINT_FILE, TrainConfig, Tokenization, TrainingCancelled, cache_frozen_layers, completion_loss,
    prepare_examples, train)

EXAMPLES = [{"messages": [{"role": "user", "content": f"Classify item {i}: {['apple', 'sky', 'grass'][i % 3]}"}],
             "completion": ["red", "blue", "green"][i % 3]} for i in range(24)]
CFG = TrainConfig(epochs=2, batch_size=4, learning_rate=5e-3, bf16=False, min_steps=0)


def torch_peft_logits(base_path, peft_dir, ids):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    conf = json.loads((peft_dir / "adapter_config.json").read_text())
    model = get_peft_model(load_model(base_path), LoraConfig(r=conf["r"], lora_alpha=conf["lora_alpha"],
                                                              target_modules=conf["target_modules"], lora_dropout=0.0,
                                                              layers_to_transform=conf.get("layers_to_transform"),
                                                              layers_pattern=conf.get("layers_pattern")))
    sd = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
          for k, v in load_file(str(peft_dir / "adapter_model.safetensors")).items()}
    result = model.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys
    with torch.no_grad():
        lora = model.base_model.model(torch.tensor([ids]))[0].numpy()
        with model.disable_adapter():
            base = model.base_model.model(torch.tensor([ids]))[0].numpy()
    return base, lora


def engine_logits(eng, ids, adapters=()):
    req = eng.submit(ids, max_tokens=1, logits_all=True, adapters=adapters)
    req.result()
    return req.logits()


@pytest.fixture(scope="module")
def trained(tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters")
    return train(tiny_model_path, EXAMPLES, CFG, out, progress=False)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_training_reduces_the_loss(trained):
    assert trained.steps == 12
    assert trained.losses[-1] < trained.losses[0] / 2
    assert trained.tokens_per_second > 0


def test_exported_gguf_adapter_matches_torch_peft(tiny_model_path, trained):
    tok = Tokenization(tiny_model_path)
    ids = tok.prompt_ids(EXAMPLES[4]["messages"])
    base_t, lora_t = torch_peft_logits(tiny_model_path, trained.peft_dir, ids)
    with Engine(tiny_model_path, flash_attn=False, kv_f32=True) as eng:
        base_e = engine_logits(eng, ids)
        lora_e = engine_logits(eng, ids, [(eng.load_adapter(trained.gguf_path), 1.0)])
    assert np.abs(lora_t - base_t).max() > 1.0       # training changed the model
    assert rel(base_e, base_t) < 1e-5                 # f32 everywhere: float rounding only
    assert rel(lora_e, lora_t) < 1e-5                 # so the adapter path must be as exact


def test_gguf_adapter_layout(trained, tiny_model_path):
    r = gguf.GGUFReader(str(trained.gguf_path))
    assert r.fields["general.type"].contents() == "adapter"
    assert r.fields["adapter.type"].contents() == "lora"
    assert r.fields["general.architecture"].contents() == "llama"
    alpha = r.fields["adapter.lora.alpha"]
    assert alpha.types[0] == gguf.GGUFValueType.FLOAT32 and alpha.contents() == CFG.alpha
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in r.tensors}
    c = read_config(gguf.GGUFReader(tiny_model_path))
    assert shapes["blk.0.attn_q.weight.lora_a"] == (CFG.rank, c.n_embd)
    assert shapes["blk.0.attn_q.weight.lora_b"] == (c.n_embd, CFG.rank)
    assert shapes["blk.1.ffn_down.weight.lora_a"] == (CFG.rank, c.n_ff)
    assert len(shapes) == 2 * 7 * c.n_layer


def test_peft_adapter_files(trained):
    conf = json.loads((trained.peft_dir / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == CFG.rank and conf["lora_alpha"] == CFG.alpha
    from safetensors import safe_open

    with safe_open(str(trained.peft_dir / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys


def adapter_tensors(path):
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}


def test_deterministic_with_a_seed(tiny_model_path, tmp_path, trained):
    again = train(tiny_model_path, EXAMPLES, CFG, tmp_path, progress=False)
    a, b = adapter_tensors(trained.gguf_path), adapter_tensors(again.gguf_path)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


class StopAfter(threading.Event):
    """A stop request that arrives after `n` steps."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def is_set(self):
        self.n -= 1
        return self.n < 0


def test_cancelled_training_resumes_to_the_adapter_of_an_uninterrupted_run(tiny_model_path, tmp_path, trained):
    ckpt = tmp_path / "ckpt"
    with pytest.raises(TrainingCancelled, match="checkpoint at step 5"):
        train(tiny_model_path, EXAMPLES, CFG, tmp_path / "out", cancel=StopAfter(5), progress=False,
              checkpoint_dir=ckpt)
    assert (ckpt / CHECKPOINT_FILE).is_file()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    res = train(tiny_model_path, EXAMPLES, CFG, tmp_path / "out", progress=False, checkpoint_dir=ckpt)
    assert res.resumed_from == 5 and res.steps == trained.steps
    assert np.allclose(res.losses, trained.losses, rtol=1e-6)
    a, b = adapter_tensors(trained.gguf_path), adapter_tensors(res.gguf_path)
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    assert not (ckpt / CHECKPOINT_FILE).exists()  # a finished run leaves no checkpoint behind


def test_a_checkpoint_of_other_data_or_config_is_not_resumed(tiny_model_path, tmp_path, trained):
    ckpt = tmp_path / "ckpt"
    with pytest.raises(TrainingCancelled):
        train(tiny_model_path, EXAMPLES, CFG, tmp_path / "a", cancel=StopAfter(5), progress=False,
              checkpoint_dir=ckpt)
    other_data = train(tiny_model_path, EXAMPLES[:-4], CFG, tmp_path / "b", progress=False, checkpoint_dir=ckpt)
    assert other_data.resumed_from == 0

    with pytest.raises(TrainingCancelled):
        train(tiny_model_path, EXAMPLES, CFG, tmp_path / "c", cancel=StopAfter(5), progress=False,
              checkpoint_dir=ckpt)
    other_config = train(tiny_model_path, EXAMPLES, TrainConfig(**{**CFG.__dict__, "learning_rate": 1e-3}),
                         tmp_path / "d", progress=False, checkpoint_dir=ckpt)
    assert other_config.resumed_from == 0

    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(InvalidRequestError, match="not a directory"):
        train(tiny_model_path, EXAMPLES, CFG, tmp_path / "f", progress=False, checkpoint_dir=tmp_path / "c.txt")

    ckpt.mkdir(exist_ok=True)
    (ckpt / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")  # e.g. cut short by a full disk
    res = train(tiny_model_path, EXAMPLES, CFG, tmp_path / "e", progress=False, checkpoint_dir=ckpt)
    assert res.resumed_from == 0 and np.allclose(res.losses, trained.losses, rtol=1e-6)


def test_cancel_leaves_no_adapter(tiny_model_path, tmp_path):
    stop = threading.Event()
    stop.set()
    with pytest.raises(TrainingCancelled):
        train(tiny_model_path, EXAMPLES, CFG, tmp_path / "out", cancel=stop, progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_input(tiny_model_path, tmp_path):
    with pytest.raises(InvalidRequestError, match="at least 2"):
        train(tiny_model_path, EXAMPLES[:1], CFG, tmp_path, progress=False)
    with pytest.raises(InvalidRequestError, match="longer than max_length"):
        train(tiny_model_path, [{"messages": [{"role": "user", "content": "word " * 300}], "completion": "x"}] * 2,
              TrainConfig(max_length=64), tmp_path, progress=False)
    with pytest.raises(InvalidRequestError, match="longer than the model's context"):  # the tiny model's is 1024
        train(tiny_model_path, [{"messages": [{"role": "user", "content": "word " * 1100}], "completion": "x"}] * 2,
              TrainConfig(max_length=4096), tmp_path, progress=False)
    with pytest.raises(InvalidRequestError, match="needs 'messages'"):
        train(tiny_model_path, [{"prompt": "x"}] * 2, CFG, tmp_path, progress=False)
    with pytest.raises(InvalidRequestError):
        TrainConfig(rank=0)
    for arch, match in (("phi3", "cannot train architecture 'phi3'; supported: llama, qwen2, qwen3, gemma3"),
                        ("qwen2", "no token_embd")):
        w = gguf.GGUFWriter(str(tmp_path / f"{arch}.gguf"), arch)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(InvalidRequestError, match=match):
            read_config(gguf.GGUFReader(str(tmp_path / f"{arch}.gguf")))


def test_parity_on_the_real_default_model(tmp_path):
    """Trained on the default model as served (Q8_0, dequantized for torch). Exported
    into a float32 copy of those same weights, llama.cpp must match torch PEFT to float
    rounding — this pins the layout for SmolLM2's shapes (9 heads, 3 KV heads, tied
    embeddings). Into the quantized Q8_0 engine, llama.cpp also quantizes activations,
    which the adapter's large effect amplifies; there we require the adapter's effect
    to agree (correlation) and the top-1 tokens to match, with the base-only error
    reported alongside."""
    served = models.resolve(None)
    f32 = models.convert(served, models.FTYPE_F32)  # the served weights, dequantized exactly
    # every block trained (lora_layers=0): the layout of each one is pinned, and the effect is
    # large enough to stand out of Q8_0's activation noise below
    res = train(None, EXAMPLES[:8], TrainConfig(epochs=1, batch_size=4, learning_rate=2e-3, min_steps=0, lora_layers=0),
                tmp_path, progress=False)
    ids = Tokenization(str(served)).prompt_ids(EXAMPLES[2]["messages"])
    base_t, lora_t = torch_peft_logits(str(served), res.peft_dir, ids)
    assert np.abs(lora_t - base_t).max() > 0.05   # the adapter does something
    with Engine(str(f32), n_ctx=1024, flash_attn=False, kv_f32=True) as eng:
        assert rel(engine_logits(eng, ids), base_t) < 1e-4
        lora_f32 = engine_logits(eng, ids, [(eng.load_adapter(res.gguf_path), 1.0)])
    assert rel(lora_f32, lora_t) < 1e-4
    with Engine(None, n_ctx=1024, flash_attn=False, kv_f32=True) as eng:
        base_q = engine_logits(eng, ids)
        lora_q = engine_logits(eng, ids, [(eng.load_adapter(res.gguf_path), 1.0)])
    assert rel(base_q, base_t) < 0.1
    assert np.corrcoef((lora_q - base_q).ravel(), (lora_t - base_t).ravel())[0, 1] > 0.95
    assert (lora_q.argmax(1) == lora_t.argmax(1)).mean() > 0.85


def test_cached_frozen_layers_give_the_same_loss(tiny_model_path):
    """Upper-layer LoRA runs the frozen blocks once per example; the loss (and so the
    gradient) must equal a full forward on a batch padded differently."""
    tok = Tokenization(tiny_model_path)
    data = prepare_examples(tok, EXAMPLES[:6], 1024)
    model = load_model(tiny_model_path)
    full, _ = completion_loss(model, data[:3])
    first = model.config.n_layer - 1
    cache_frozen_layers(model, data, first, batch_size=6)  # cached in a batch of 6, used in one of 3
    cached, _ = completion_loss(model, data[:3], first_trained=first)
    assert abs(float(full) - float(cached)) < 1e-5 * abs(float(full))


def test_upper_layer_adapter_matches_torch_peft(tiny_model_path, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=4, learning_rate=5e-3, bf16=False, lora_layers=1, min_steps=0)
    res = train(tiny_model_path, EXAMPLES, cfg, tmp_path, progress=False)
    conf = json.loads((res.peft_dir / "adapter_config.json").read_text())
    n_layer = read_config(gguf.GGUFReader(tiny_model_path)).n_layer
    assert conf["layers_to_transform"] == [n_layer - 1]
    names = {t.name for t in gguf.GGUFReader(str(res.gguf_path)).tensors}
    assert names and all(n.startswith(f"blk.{n_layer - 1}.") for n in names)
    assert res.losses[-1] < res.losses[0]
    tok = Tokenization(tiny_model_path)
    ids = tok.prompt_ids(EXAMPLES[0]["messages"])
    base_t, lora_t = torch_peft_logits(tiny_model_path, res.peft_dir, ids)
    assert rel(lora_t, base_t) > 1e-3  # the adapter does something
    with Engine(tiny_model_path, flash_attn=False, kv_f32=True) as eng:
        a = eng.load_adapter(res.gguf_path)
        got = engine_logits(eng, ids, [(a, 1.0)])
    assert rel(got, lora_t) < 1e-5


def test_shared_prefix_gives_the_same_loss_and_gradient(tiny_model_path):
    """The prompts of one task share their start; computing it once per batch must not
    change the loss or the LoRA gradient."""
    from peft import LoraConfig, get_peft_model

    from mtllm_locally.learn.trainer import shared_prefix_length

    tok = Tokenization(tiny_model_path)
    data = prepare_examples(tok, [{"messages": [{"role": "system", "content": "You sort things by colour."},
                                                {"role": "user", "content": f"item {i}: {w}"}], "completion": c}
                                  for i, (w, c) in enumerate([("apple", "red"), ("sky", "blue"),
                                                              ("grass is long", "green")])], 1024)
    assert shared_prefix_length(data) >= 8
    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_model_path), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0, init_lora_weights=False))
    core = model.base_model.model
    grads = []
    for share in (False, True):
        model.zero_grad()
        loss, n = completion_loss(core, data, share_prefix=share)
        loss.backward()
        grads.append((float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (l0, g0), (l1, g1) = grads
    assert abs(l0 - l1) < 1e-5 * abs(l0)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_lora_forward_matches_peft(tiny_model_path, arch, tmp_path):
    """The trainer's LoRA forward (lora_linear.py: base and LoRA in one GEMM, q/k/v stacked)
    must give PEFT's loss and LoRA gradients, with Qwen2's q/k/v biases too."""
    from peft import LoraConfig, get_peft_model

    from mtllm_locally.bench.tiny_models import FAMILIES, build_tiny_llama
    from mtllm_locally.learn.lora_linear import use_fused_forward

    if arch != "llama":
        tiny_model_path = str(tmp_path / f"{arch}.gguf")
        build_tiny_llama(tiny_model_path, FAMILIES[arch])
    data = prepare_examples(Tokenization(tiny_model_path), EXAMPLES[:6], 1024)
    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_model_path), LoraConfig(
        r=4, lora_alpha=8, target_modules=list(export.TARGET_MODULES), lora_dropout=0.0, init_lora_weights=False))
    core = model.base_model.model
    results = []
    for fused in (False, True):
        if fused:
            assert use_fused_forward(model) == 7 * core.config.n_layer
            assert all(layer.self_attn.project_qkv is not None for layer in core.model.layers)
        model.zero_grad()
        loss, _ = completion_loss(core, data)
        loss.backward()
        results.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.requires_grad}))
    (l0, g0), (l1, g1) = results
    assert abs(l0 - l1) < 1e-5 * abs(l0)
    assert g0.keys() == g1.keys() and len(g0) == 2 * 7 * core.config.n_layer
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-6), n
    with model.disable_adapter(), torch.no_grad():  # PEFT's switch still works on the fused forward
        ids = torch.tensor([data[0].prompt_ids])
        assert torch.allclose(core(ids), load_model(tiny_model_path)(ids), atol=1e-5)


def test_torch_model_matches_transformers(tiny_model_path):
    """The trainer's model (read from GGUF, q/k rows un-permuted) computes what transformers'
    LlamaForCausalLM computes with the same weights."""
    pytest.importorskip("transformers")
    from mtllm_locally.learn.torch_model import transformers_model

    ids = torch.tensor([prepare_examples(Tokenization(tiny_model_path), EXAMPLES[:2], 1024)[0].prompt_ids])
    with torch.no_grad():
        ours = load_model(tiny_model_path)(ids)
        theirs = transformers_model(tiny_model_path).eval()(input_ids=ids).logits
    assert ours.shape == theirs.shape
    assert rel(ours.numpy(), theirs.numpy()) < 1e-5


def test_rope_frequency_factors_and_linear_scaling_match_llama_cpp(tmp_path):
    """Llama 3.1+ GGUFs carry per-frequency RoPE factors; some models scale RoPE linearly.
    The trainer's model must compute what the engine serves for both."""
    from tiny_llama import TinyConfig, build_tiny_llama

    path = tmp_path / "rope.gguf"
    build_tiny_llama(path, TinyConfig(rope_freq_factors=True, rope_linear_scale=2.0, seed=3))
    plain = tmp_path / "plain.gguf"
    build_tiny_llama(plain, TinyConfig(seed=3))
    ids = Tokenization(str(path)).prompt_ids(EXAMPLES[0]["messages"])
    with torch.no_grad():
        ours = load_model(path)(torch.tensor([ids]))[0].numpy()
        without = load_model(plain)(torch.tensor([ids]))[0].numpy()
    with Engine(str(path), flash_attn=False, kv_f32=True) as eng:
        served = engine_logits(eng, ids)
    assert rel(ours, without) > 1e-2  # the factors matter ...
    assert rel(ours, served) < 1e-5   # ... and the trainer applies them as llama.cpp does


def test_unknown_tensors_and_rope_scalings_are_refused(tmp_path, tiny_model_path):
    """A model the trainer would compute differently from the engine is refused, not trained."""
    reader = gguf.GGUFReader(tiny_model_path)
    for extra, match in (("tensor", "no place"), ("yarn", "RoPE scaling")):
        path = tmp_path / f"{extra}.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            vtype = field.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_key_value(key, field.contents(), vtype, sub_type=field.types[1])
            else:
                w.add_key_value(key, field.contents(), vtype)
        if extra == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(4.0)
        for t in reader.tensors:
            w.add_tensor(t.name, np.array(t.data).reshape(tuple(int(d) for d in reversed(t.shape))))
        if extra == "tensor":
            w.add_tensor("attn_sinks.weight", np.zeros(4, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(InvalidRequestError, match=match):
            load_model(path)


def test_a_warm_start_continues_from_the_previous_adapter(tiny_model_path, tmp_path, trained):
    cold_first = trained.losses[0]
    warm = train(tiny_model_path, EXAMPLES, CFG, tmp_path / "warm", progress=False, init_from=trained.peft_dir)
    # it starts where the previous adapter ended, not where a fresh LoRA (B = 0) starts
    assert warm.losses[0] < 0.5 * cold_first
    assert warm.losses[0] <= trained.losses[-1] * 1.5 + 1e-3
    with pytest.raises(InvalidRequestError, match="does not fit this LoRA"):
        train(tiny_model_path, EXAMPLES, TrainConfig(**{**CFG.__dict__, "rank": 4}), tmp_path / "bad",
              progress=False, init_from=trained.peft_dir)
    with pytest.raises(InvalidRequestError, match="init_from: cannot read"):
        train(tiny_model_path, EXAMPLES, CFG, tmp_path / "none", progress=False, init_from=tmp_path / "missing")


def test_the_thread_budget_is_asked_every_step_and_followed(tiny_model_path, tmp_path):
    seen = []  # torch's thread count when each step asks for its budget

    def budget():
        seen.append(torch.get_num_threads())
        return 1 if len(seen) % 2 else 2

    before = torch.get_num_threads()
    try:
        res = train(tiny_model_path, EXAMPLES[:8], TrainConfig(epochs=1, batch_size=2, min_steps=0, bf16=False),
                    tmp_path, progress=False, thread_budget=budget)
    finally:
        torch.set_num_threads(before)
    assert len(seen) == res.steps == 4
    assert seen[1:] == [1, 2, 1]  # each step ran with what the previous answer asked for
