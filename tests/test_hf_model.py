"""The served GGUF as a Hugging Face model directory, and the PEFT adapter PEFT writes.

What vLLM will load for issue 17's scale-out, checked without vLLM: for each family's tiny
model (with the family's chat template) and for the real default model,
- transformers' AutoModelForCausalLM on the directory computes what the trainer's torch
  model computes;
- the saved tokenizer, with the saved chat template, renders and encodes a chat exactly
  as our engine does (the one exception, text of a special token inside a message, is
  pinned down below);
- the PEFT adapter the trainer writes is PEFT's own, names its Hugging Face base, and
  PeftModel.from_pretrained on transformers' class computes what our torch PEFT model does.
"""

import json
import stat
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from mtllm_locally import InvalidRequestError, models  # noqa: E402
from mtllm_locally.bench.tiny_models import FAMILIES, TinyConfig, build_tiny_llama  # noqa: E402
from mtllm_locally.learn.export import hf_base_name  # noqa: E402
from mtllm_locally.learn.hf_model import MANIFEST, write_hf_model  # noqa: E402
from mtllm_locally.learn.torch_model import load_model, transformers_model  # noqa: E402
from mtllm_locally.learn.trainer import TrainConfig, Tokenization, train  # noqa: E402
from test_trainer import torch_peft_logits  # noqa: E402

TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE_OF = {"qwen2": "qwen2.5-instruct.jinja", "qwen3": "qwen3.jinja", "gemma3": "gemma3-it.jinja"}
# llama with linear RoPE scaling: transformers' config must carry it
TINY = {**{arch: replace(cfg, chat_template=(TEMPLATES / TEMPLATE_OF[arch]).read_text() if arch in TEMPLATE_OF
                         else None) for arch, cfg in FAMILIES.items()},
        "llama-linear-rope": TinyConfig(rope_linear_scale=2.0, seed=5)}
# transformers loads any qwen2 model's tokenizer as Qwen2Tokenizer, with Qwen2's split, whatever
# tokenizer.json says; a real Qwen2 GGUF has that split in llama.cpp too (`pre` qwen2), so the
# tiny Qwen2, whose vocabulary is SmolLM2's, gets it as well
PRE_TOKENIZER = {"qwen2": "qwen2"}
CHATS = [
    [{"role": "user", "content": "Classify item 7, a thing seen outdoors: grass"}],
    [{"role": "system", "content": "Answer with the colour only."},
     {"role": "user", "content": "It's 2024-01-05: 12345 + 0.678 = ?  Two  spaces,\n\ta tab."},
     {"role": "assistant", "content": "blue"},
     {"role": "user", "content": "Ünïcödé 中文 한국어 🎉 and code: def f(x):\n    return x**2"}],
]


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def private(directory: Path) -> bool:
    return all(stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600)
               for p in [directory, *directory.rglob("*")])


def with_pre_tokenizer(src: Path, dst: Path, pre: str) -> Path:
    """A copy of the GGUF at `src` whose `tokenizer.ggml.pre` (llama.cpp's split) is `pre`."""
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(str(src))
    copy_with_new_metadata(reader, gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents()),
                           {"tokenizer.ggml.pre": MetadataDetails(gguf.GGUFValueType.STRING, pre)}, [])
    return dst


def tiny_model(directory: Path, name: str) -> Path:
    path = directory / f"tiny-{name}.gguf"
    build_tiny_llama(path, TINY[name])
    if name in PRE_TOKENIZER:
        path = with_pre_tokenizer(path, directory / f"tiny-{name}-{PRE_TOKENIZER[name]}.gguf", PRE_TOKENIZER[name])
    return path


@pytest.fixture
def offline(monkeypatch):
    """The connections attempted while it is on (each refused): the no-download promise.
    Recorded rather than raised: a library may swallow the error (PEFT asks the Hub
    whether a base's vocabulary changed, and warns when it cannot)."""
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("offline")

    for name in ("socket", "create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, refuse)
    return attempts


@pytest.fixture(scope="module", params=list(TINY))
def exported(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    path = tiny_model(directory, request.param)
    return str(path), write_hf_model(path, directory / "hf", progress=False)


def test_transformers_loads_the_directory_and_computes_what_the_trainer_computes(exported):
    path, out = exported
    ids = Tokenization(path).prompt_ids(CHATS[1])
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == type(transformers_model(path)).__name__
    assert model.dtype == torch.float32
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        ours = load_model(path)(torch.tensor([ids]))[0].numpy()
    assert rel(theirs, ours) < 1e-5


def test_the_saved_tokenizer_renders_and_encodes_chats_as_the_engine_does(exported):
    """Rendered text and token ids, compared whole: add_special_tokens=False because the
    template writes any BOS itself (vLLM encodes chat prompts so); our encoder adds one
    only where the GGUF asks and the text does not start with it (none of these do)."""
    path, out = exported
    ours = Tokenization(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for chat in CHATS:
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert text == ours.template.render(chat)
        assert tokenizer.encode(text, add_special_tokens=False) == ours.prompt_ids(chat)


def test_the_directory_says_where_it_came_from(exported):
    path, out = exported
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source_gguf"] == Path(path).name and manifest["base"] == models.fingerprint(path)
    assert manifest["dtype"] == "float32"
    vocab = Tokenization(path).model
    generation = json.loads((out / "generation_config.json").read_text())
    stops = generation["eos_token_id"] if isinstance(generation["eos_token_id"], list) else [generation["eos_token_id"]]
    assert stops[0] == vocab.eos and all(vocab.is_eog(t) for t in stops)
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert private(out)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_special_token_text_in_a_message_is_plain_text_for_us_and_a_control_token_for_transformers(exported):
    """The one place the two encodings differ, by design: our engine tokenizes a special
    token's text inside a message as text (a user cannot close a turn), transformers'
    tokenizer (and so vLLM) parses it. Prompts sent to both must not contain such text."""
    path, out = exported
    ours = Tokenization(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "say <|im_end|> now"}]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    theirs, ids = tokenizer.encode(text, add_special_tokens=False), ours.prompt_ids(chat)
    assert theirs.count(im_end) == ids.count(im_end) + 1


def test_an_existing_directory_is_replaced_only_if_it_is_an_earlier_export(tmp_path, tiny_model_path, offline):
    mine, adapter = tmp_path / "mine", tmp_path / "adapter"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    adapter.mkdir()  # what `mtllm-locally export` copies out has a manifest of that name too
    (adapter / MANIFEST).write_text(json.dumps({"adapter_id": "classify-v1"}))
    for directory in (mine, adapter):
        with pytest.raises(InvalidRequestError, match="not an earlier"):
            write_hf_model(tiny_model_path, directory, progress=False)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and [p.name for p in adapter.iterdir()] == [MANIFEST]
    out = write_hf_model(tiny_model_path, tmp_path / "hf", progress=False)
    (out / "stale.bin").write_text("from an earlier export")
    again = write_hf_model(tiny_model_path, out, progress=False, dtype=torch.bfloat16)
    assert not (again / "stale.bin").exists()
    assert json.loads((again / MANIFEST).read_text())["dtype"] == "bfloat16"
    assert offline == []


def test_the_cli_exports_the_model_it_is_given(tmp_path, tiny_model_path):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mtllm_locally", *args], capture_output=True, text=True,
                              timeout=600)

    r = cli("export-hf", tiny_model_path, str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "hf" / MANIFEST).read_text())["source_gguf"] == Path(tiny_model_path).name
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    r = cli("--model", tiny_model_path, "export-hf", str(tmp_path / "mine"))  # the global --model is the default
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "not an earlier" in r.stderr


def test_a_tokenizer_transformers_would_load_differently_is_refused(tmp_path):
    """SmolLM2's vocabulary in a qwen2 model, split as SmolLM2 splits: transformers loads
    Qwen2's tokenizer for it, which splits "\\n    " apart; nothing is written."""
    path = tmp_path / "qwen2-smollm-split.gguf"
    build_tiny_llama(path, FAMILIES["qwen2"])
    with pytest.raises(InvalidRequestError, match="Qwen2Tokenizer.* splits .* differently from llama.cpp"):
        write_hf_model(path, tmp_path / "hf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen2-smollm-split.gguf"]


def test_llama_3_rope_factors_are_refused(tmp_path):
    path = tmp_path / "rope.gguf"
    build_tiny_llama(path, TinyConfig(rope_freq_factors=True))
    with pytest.raises(InvalidRequestError, match="RoPE frequency factors"):
        write_hf_model(path, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_the_default_model_as_a_hugging_face_directory(tmp_path):
    path = models.resolve(None)
    out = write_hf_model(path, tmp_path / "smollm2", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"],
            config["tie_word_embeddings"]) == (["LlamaForCausalLM"], 30, 576, 49152, True)
    assert json.loads((out / MANIFEST).read_text())["hf_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    ours = Tokenization(str(path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for chat in CHATS + [[{"role": "user", "content": "What is the capital of France? Answer in one word."}]]:
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert tokenizer.encode(text, add_special_tokens=False) == ours.prompt_ids(chat)
    ids = torch.tensor([ours.prompt_ids([{"role": "user", "content": "What is the capital of France?"}])])
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits[0].numpy()
        mine = load_model(path)(ids)[0].numpy()
    assert theirs[-1].argmax() == mine[-1].argmax()  # the greedy next token
    assert rel(theirs, mine) < 1e-5


# --- the PEFT adapter ------------------------------------------------------------------------------

EXAMPLES = [{"messages": [{"role": "user", "content": f"Classify item {i}: {['apple', 'sky', 'grass'][i % 3]}"}],
             "completion": ["red", "blue", "green"][i % 3]} for i in range(24)]
CFG = TrainConfig(epochs=2, batch_size=4, learning_rate=5e-3, bf16=False, min_steps=0)


@pytest.mark.parametrize("arch,lora_layers", [("llama", 0), ("qwen3", 1)])
def test_the_peft_adapter_is_peft_s_own_and_loads_on_transformers_class(tmp_path, arch, lora_layers, offline):
    """Written by PeftModel.save_pretrained from the trained model; PEFT's loader on
    transformers' class (what a PEFT or vLLM user has) computes what our torch PEFT model
    computes, with LoRA on every block and on the top block only (layers_to_transform)."""
    from peft import PeftModel
    from safetensors import safe_open

    path = tiny_model(tmp_path, arch)
    res = train(str(path), EXAMPLES, replace(CFG, lora_layers=lora_layers), tmp_path / "out", progress=False)
    assert offline == []
    conf = json.loads((res.peft_dir / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == f"tiny-random-{arch}"  # the GGUF's name: no repository in it
    assert conf["task_type"] == "CAUSAL_LM" and conf["auto_mapping"] is None  # AutoPeftModel loads HF's class
    assert conf["layers_to_transform"] == ([1] if lora_layers else None)
    assert conf["r"] == CFG.rank and conf["lora_alpha"] == CFG.alpha and conf["peft_version"]
    card = (res.peft_dir / "README.md").read_text()
    assert f"base_model: tiny-random-{arch}" in card and f"base_model_gguf: {models.fingerprint(path)}" in card
    with safe_open(str(res.peft_dir / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    first = 1 if lora_layers else 0
    assert f"base_model.model.model.layers.{first}.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 7 * (2 - first)
    assert private(res.peft_dir)

    ids = Tokenization(str(path)).prompt_ids(EXAMPLES[4]["messages"])
    base_t, lora_t = torch_peft_logits(str(path), res.peft_dir, ids)
    hf = PeftModel.from_pretrained(transformers_model(path), str(res.peft_dir))
    with torch.no_grad():
        hf_lora = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(lora_t - base_t).max() > 1.0  # training changed the model ...
    assert rel(hf_lora, lora_t) < 1e-5          # ... and transformers' class with PEFT's loader agrees


def gguf_with(path: Path, fields: dict[str, str]) -> str:
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        w.add_string(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("fields,expected", [
    ({"general.source.url": "https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct",
      "general.base_model.0.repo_url": "https://huggingface.co/Qwen/Qwen2.5-0.5B"}, "Qwen/Qwen2.5-0.5B-Instruct"),
    ({"general.source.huggingface.repository": "org/model"}, "org/model"),
    ({"general.source.url": "https://example.com/weights", "general.organization": "Qwen",
      "general.basename": "Qwen2.5", "general.size_label": "0.5B", "general.finetune": "Instruct",
      "general.base_model.0.repo_url": "https://huggingface.co/Qwen/Qwen2.5-0.5B"}, "Qwen/Qwen2.5-0.5B-Instruct"),
    ({"general.organization": "HuggingFaceTB", "general.name": "Smollm2 135M 8k Lc100K Mix1 Ep2",
      "general.basename": "smollm2"}, "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ({"general.name": "Gemma 3 270m", "general.basename": "gemma-3", "general.size_label": "270M"}, "gemma-3-270M"),
    ({"general.name": "tiny-random-llama"}, "tiny-random-llama"),
    ({}, "plain.gguf"),
])
def test_the_hugging_face_name_of_a_gguf(tmp_path, fields, expected):
    """A source repository wins; general.base_model.* names the model this one was
    fine-tuned from (other weights) and is never used."""
    path = gguf_with(tmp_path / "plain.gguf", fields)
    assert hf_base_name(gguf.GGUFReader(path), path) == expected
