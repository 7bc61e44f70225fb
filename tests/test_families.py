"""Each model family the trainer knows, through everything learning touches.

For Qwen2 (q/k/v biases), Qwen3 (q/k head norms, its own head size) and Gemma 3 (scaled
embeddings, four norms per block, GELU, sliding-window layers with their own RoPE base),
on a tiny random GGUF carrying the family's real chat template:
- the trainer's torch model computes what transformers' own class computes with the
  same weights, and what llama.cpp serves;
- an adapter trained and exported by us computes in the engine what it computes in
  PEFT, on our model and on transformers' class (the model vLLM serves);
- the learning loop: captured calls -> dataset -> train -> export -> gate -> promote ->
  hot deploy, the family's template rendered by the one renderer in both loops.
"""

import json
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from mtllm_locally import Engine  # noqa: E402
from mtllm_locally.bench.tiny_models import FAMILIES, build_tiny_llama  # noqa: E402
from mtllm_locally.learn.torch_model import load_model, transformers_model  # noqa: E402
from mtllm_locally.learn.trainer import TrainConfig, Tokenization, train  # noqa: E402
from test_trainer import torch_peft_logits  # noqa: E402

TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE_OF = {"qwen2": "qwen2.5-instruct.jinja", "qwen3": "qwen3.jinja", "gemma3": "gemma3-it.jinja"}
NEW_FAMILIES = tuple(TEMPLATE_OF)
# llama.cpp's CPU GELU reads a float16 table: Gemma's logits match to ~1e-3, the others to float rounding
TOLERANCE = {"qwen2": 1e-5, "qwen3": 1e-5, "gemma3": 3e-3}

SYSTEM = "Answer with the colour only."
EXAMPLES = [{"messages": [{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": f"Classify item {i}, a thing seen outdoors: "
                                                      f"{['apple', 'sky', 'grass'][i % 3]}"}],
             "completion": ["red", "blue", "green"][i % 3]} for i in range(24)]
CFG = TrainConfig(epochs=2, batch_size=4, learning_rate=5e-3, bf16=False, min_steps=0)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def family_model(directory: Path, arch: str, **changes) -> str:
    path = directory / f"tiny-{arch}.gguf"
    build_tiny_llama(path, replace(FAMILIES[arch], chat_template=(TEMPLATES / TEMPLATE_OF[arch]).read_text(),
                                   **changes))
    return str(path)


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def family(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    path = family_model(directory, request.param)
    return request.param, path, train(path, EXAMPLES, CFG, directory / "adapter", progress=False)


def served_logits(path, ids, adapter=None):
    with Engine(path, flash_attn=False, kv_f32=True) as eng:
        req = eng.submit(ids, max_tokens=1, logits_all=True,
                         adapters=[(eng.load_adapter(adapter), 1.0)] if adapter else ())
        req.result()
        return req.logits()


def test_the_torch_model_computes_what_transformers_and_llama_cpp_compute(family, tmp_path):
    arch, path, _ = family
    ids = Tokenization(path).prompt_ids(EXAMPLES[1]["messages"])
    with torch.no_grad():
        ours = load_model(path)(torch.tensor([ids]))[0].numpy()
        theirs = transformers_model(path)(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    assert rel(ours, theirs) < 1e-5
    assert rel(ours, served_logits(path, ids)) < TOLERANCE[arch]
    if arch == "gemma3":  # the prompt is longer than the window: the sliding layers must mask as llama.cpp does
        assert len(ids) > 2 * FAMILIES[arch].sliding_window
        unwindowed = family_model(tmp_path, arch, sliding_window=0)
        with torch.no_grad():
            plain = load_model(unwindowed)(torch.tensor([ids]))[0].numpy()
        assert rel(plain, ours) > 30 * TOLERANCE[arch]


def transformers_peft_logits(path, peft_dir, ids):
    """Logits of transformers' class for the family with and without the saved adapter,
    loaded by PEFT's own loader (what a PEFT or vLLM user does with it)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(transformers_model(path), str(peft_dir))
    with torch.no_grad():
        lora = model(torch.tensor([ids])).logits[0].float().numpy()
        with model.disable_adapter():
            base = model(torch.tensor([ids])).logits[0].float().numpy()
    return base, lora


def test_the_exported_adapter_serves_what_peft_computes(family):
    arch, path, trained = family
    assert trained.losses[-1] < 0.75 * trained.losses[0]
    reader = gguf.GGUFReader(str(trained.gguf_path))
    assert reader.fields["general.architecture"].contents() == arch  # llama.cpp refuses another
    ids = Tokenization(path).prompt_ids(EXAMPLES[4]["messages"])
    base_t, lora_t = torch_peft_logits(path, trained.peft_dir, ids)
    _, hf_lora = transformers_peft_logits(path, trained.peft_dir, ids)
    base_e, lora_e = served_logits(path, ids), served_logits(path, ids, trained.gguf_path)
    assert np.abs(lora_t - base_t).max() > 1.0      # training changed the model ...
    assert rel(hf_lora, lora_t) < 1e-5              # ... the same in transformers' class (PEFT's own loader)
    assert rel(lora_e, lora_t) < TOLERANCE[arch]    # ... and in the engine
    # the adapter's effect, not only the sum, is what llama.cpp computes
    assert rel(lora_e - base_e, lora_t - base_t) < 20 * TOLERANCE[arch]


# --- the loop end to end --------------------------------------------------------------------------

litellm = pytest.importorskip("litellm")

from loop_helpers import RF, answer_for, messages, register_oracle, wait_for, word_of  # noqa: E402
from mtllm_locally import models  # noqa: E402
from mtllm_locally.state.registry import Registry  # noqa: E402
from runtime_helpers import own_runtime  # noqa: E402

POLICY = dict(min_new_examples=51, demonstrations=0, min_interval_s=0.0, threads=1, min_heldout=4, margin=0.05,
              train={"learning_rate": 1e-2, "rank": 8, "alpha": 16, "bf16": False})


@pytest.mark.parametrize("arch", NEW_FAMILIES)
def test_the_loop_learns_a_task_on_each_family(arch, tmp_path):
    path = family_model(tmp_path, arch)
    register_oracle()
    with own_runtime(tmp_path / "calls.sqlite3") as rt:
        rt.policy.reset()
        rt.policy.configure(**POLICY)
        rt.policy.configure("classify", teacher="oracle/labeller", teacher_until=0.0)
        rt.settings.max_shadows = 0  # no student shadows: this test is about the learning path

        def call(i, word=None):
            msgs = messages(i, word or word_of(i))
            r = litellm.completion(model=f"mtllm_locally/{path}", messages=msgs, response_format=RF,
                                   metadata={"jac_caller_name": "classify", "jac_invocation_id": f"inv-{i}"})
            rt.finish_call(f"inv-{i}", accepted=True)
            return msgs, r.choices[0].message.content

        for i in range(60):  # captured: the teacher answers, the store records the program's messages
            call(i)
        st = rt.store()
        reg = Registry(st)
        task = st.tasks()[0]["task_key"]
        v1 = wait_for(lambda: next((v for v in reg.versions(task) if v.status != "training"), None), 300,
                      f"the first {arch} training to finish")
        assert v1.status == "passed", (v1.error, v1.metrics)
        assert reg.deployed(task, models.fingerprint(path)).adapter_id == v1.adapter_id
        assert gguf.GGUFReader(str(v1.gguf_path)).fields["general.architecture"].contents() == arch

        # hot deploy: the running engine serves the task with the new adapter
        msgs, out = call(1000, "sky")
        assert st.rows("SELECT adapter, source FROM turns ORDER BY id DESC LIMIT 1")[0] == {
            "adapter": v1.adapter_id, "source": "model"}
        assert json.loads(out) == json.loads(answer_for(msgs))
        # the prompt it was trained on is the one served: the family's template, one renderer
        rendered = Tokenization(path).template.render(msgs)
        assert {"qwen2": "<|im_start|>system\n", "qwen3": "<|im_start|>system\n",
                "gemma3": "<start_of_turn>user\n" + msgs[0]["content"]}[arch] in rendered
        assert st.rows("SELECT prompt_tokens FROM turns ORDER BY id DESC LIMIT 1")[0]["prompt_tokens"] == len(
            Tokenization(path).prompt_ids(msgs))
