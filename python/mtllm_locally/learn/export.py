"""Write a trained LoRA in the two formats that matter: a GGUF adapter llama.cpp
loads into the running engine, and a PEFT adapter (safetensors + adapter_config.json)
that PEFT, vLLM or LoRAX load on the Hugging Face model.

Both are written atomically (temporary file, then rename): an interrupted export
never leaves a half adapter where a deploy could pick it up. Both are private to
their owner (0600 files, 0700 directories) whatever the umask: they are trained on
the user's prompts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

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


def write_peft_adapter(directory: str | Path, weights: dict, alpha: float, rank: int, use_rslora: bool = False,
                       base_model: str = "", layers: list[int] | None = None) -> Path:
    directory = Path(directory)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, (a, b) in weights.items():
        tensors[f"base_model.model.{key}.lora_A.weight"] = torch.from_numpy(np.ascontiguousarray(a))
        tensors[f"base_model.model.{key}.lora_B.weight"] = torch.from_numpy(np.ascontiguousarray(b))
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    modules = sorted({k.rsplit(".", 1)[-1] for k in weights})
    (tmp / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": modules, "bias": "none", "use_rslora": use_rslora, "fan_in_fan_out": False,
        "base_model_name_or_path": base_model, "inference_mode": True,
        "layers_to_transform": layers, "layers_pattern": "layers" if layers else None}, indent=2))
    make_private(tmp)
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory
