"""Write a trained LoRA in the two formats that matter: a GGUF adapter llama.cpp
loads into the running engine, and a PEFT adapter that PEFT, vLLM or LoRAX load on the
Hugging Face model, written by PEFT's own `save_pretrained` from the trained model
(its module names are transformers' for the family, so the keys are what PEFT would
write for transformers' class). The PEFT adapter names its Hugging Face base
(`base_model_name_or_path`, from the GGUF's metadata: `hf_base_name`) and records the
GGUF it was trained on (its fingerprint) in its model card.

Both are written atomically (temporary file or directory, then rename): an interrupted
export never leaves a half adapter where a deploy could pick it up. Both are private to
their owner (0600 files, 0700 directories) whatever the umask: they are trained on
the user's prompts.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path
from types import MappingProxyType

import gguf
import numpy as np

from ..state.files import make_private
from .torch_model import ModelShape, gguf_name, permute_qk, tensor_names

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_weights(peft_model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"model.layers.N.self_attn.q_proj": (A (r, in), B (out, r))} in HF layout."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            key = name.split("base_model.model.", 1)[-1]
            a = module.lora_A["default"].weight.detach().float().cpu().numpy()
            b = module.lora_B["default"].weight.detach().float().cpu().numpy()
            out[key] = (a, b)
    return out


def write_gguf_adapter(path: str | Path, weights: dict, config: ModelShape, alpha: float, rank: int,
                       use_rslora: bool = False, metadata: dict | None = None) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    # llama.cpp refuses an adapter whose architecture is not its model's
    w = gguf.GGUFWriter(str(tmp), config.arch)
    names = tensor_names(config)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    # llama.cpp scales by alpha / r; rsLoRA scales by alpha / sqrt(r), i.e. (alpha * sqrt(r)) / r.
    w.add_float32("adapter.lora.alpha", float(alpha * np.sqrt(rank) if use_rslora else alpha))
    for k, v in (metadata or {}).items():
        w.add_string(f"mtllm.{k}", str(v))
    for key, (a, b) in sorted(weights.items()):
        base = gguf_name(names, key + ".weight")
        if base is None:
            raise ValueError(f"no GGUF tensor for LoRA module {key} in a {config.arch} model")
        kind = base.split(".")[2]
        if config.permuted_qk and kind == "attn_q":
            b = permute_qk(b, config.n_head)
        elif config.permuted_qk and kind == "attn_k":
            b = permute_qk(b, config.n_head_kv)
        w.add_tensor(base + ".lora_a", np.ascontiguousarray(a, dtype=np.float32))
        w.add_tensor(base + ".lora_b", np.ascontiguousarray(b, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    make_private(tmp)
    os.replace(tmp, path)
    return path


# The Hugging Face names of models we ship, whose GGUF metadata does not say it (the
# embedded SmolLM2 was converted from a training checkpoint: its name is the run's).
KNOWN_HF_NAMES = MappingProxyType({
    ("HuggingFaceTB", "Smollm2 135M 8k Lc100K Mix1 Ep2"): "HuggingFaceTB/SmolLM2-135M-Instruct"})
# Metadata that names the repository the GGUF was converted from, most specific first.
# Not `general.base_model.N.*`: that is the model card's `base_model`, the model this one
# was fine-tuned from (Qwen2.5-0.5B for Qwen2.5-0.5B-Instruct), whose weights differ.
SOURCE_KEYS = ("general.source.huggingface.repository", "general.source.repo_url", "general.source.url",
               "general.repo_url", "general.url")
_HUB_REPO = re.compile(r"^(?:https?://(?:www\.)?huggingface\.co/)?([\w.-]+/[\w.-]+?)(?:\.git)?(?:/.*)?$")


def hf_base_name(reader: gguf.GGUFReader, path: str | os.PathLike) -> str:
    """The Hugging Face model the GGUF at `path` was made from, as `org/name`: from a
    source repository in its metadata, else a model we know, else the name its
    `general.*` naming fields compose (convert_hf_to_gguf derives them from the repo
    name: `Qwen/Qwen2.5-0.5B-Instruct` is organization, basename, size label and
    finetune; it may not be a repository that exists), else the file name."""
    def text(key: str) -> str:
        f = reader.fields.get(key)
        try:
            return str(f.contents()).strip() if f is not None else ""
        except Exception:  # a value that is not text
            return ""

    for key in SOURCE_KEYS:
        value = text(key)
        match = _HUB_REPO.match(value) if "huggingface.co" in value or "://" not in value else None
        if match:
            return match.group(1)
    org, name = text("general.organization"), text("general.name")
    if (org, name) in KNOWN_HF_NAMES:
        return KNOWN_HF_NAMES[org, name]
    parts = [text(k) for k in ("general.basename", "general.size_label", "general.finetune")]
    if parts[0]:
        return "/".join(filter(None, [org, "-".join(filter(None, parts))]))
    return name or Path(path).name


def install_directory(tmp: Path, final: Path) -> Path:
    """Make the finished directory `tmp` private and rename it to `final`. An existing
    `final` is moved aside first and removed after: a reader finds the old complete
    directory or the new one, never a mix."""
    make_private(tmp)
    old = final.with_name(f".{final.name}.old{os.getpid()}") if final.exists() else None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_peft_adapter(directory: str | Path, peft_model, *, base_model: str, base_fingerprint: str,
                       adapter_name: str = "default") -> Path:
    """`peft_model.save_pretrained` into `directory`, naming `base_model` (the Hugging Face
    name) as the base; its model card records the GGUF it was trained on."""
    from huggingface_hub import ModelCard

    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    trained = peft_model.peft_config[adapter_name]
    # As saved: for a causal LM, so AutoPeftModelForCausalLM loads transformers' class by
    # name (without a task type PEFT would record our torch class as the one to load).
    peft_model.peft_config[adapter_name] = dataclasses.replace(trained, base_model_name_or_path=base_model,
                                                               task_type="CAUSAL_LM")
    try:
        # save_embedding_layers "auto" would ask the Hub whether the base's vocabulary changed;
        # we never train the embeddings, and never go online
        peft_model.save_pretrained(str(tmp), selected_adapters=[adapter_name], save_embedding_layers=False)
        # The card PEFT wrote, parsed from its text: ModelCard.load of a path that is missing
        # would take it for a Hub repository and go online.
        written = tmp / "README.md"
        card = ModelCard(written.read_text() if written.is_file() else "---\n---\n")
        card.data.base_model = base_model
        card.data["base_model_gguf"] = base_fingerprint
        card.save(tmp / "README.md")
        return install_directory(tmp, directory)
    finally:
        peft_model.peft_config[adapter_name] = trained
        shutil.rmtree(tmp, ignore_errors=True)
