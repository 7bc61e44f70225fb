"""Tiny random GGUF models of each family the trainer knows (llama, qwen2, qwen3, gemma3).

They reuse the real SmolLM2 tokenizer and chat template (copied from the embedded
model's GGUF) unless given another template, so prompts tokenize and render exactly as
in production, while the transformer is a few kilobytes of random weights that
llama.cpp runs in microseconds. Weights are float32 so references can match them.

Weights are made in Hugging Face layout (what torch/PEFT train on) and written the
way llama.cpp's converter writes them: for Llama only, q/k rows permuted for llama.cpp's
interleaved RoPE. The families bench and the tests build their models here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .. import models

TOKENIZER_KEYS = (
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template",
)


@dataclass(frozen=True)
class TinyConfig:
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx: int = 1024
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    seed: int = 0
    logit_scale: float = 4.0  # spreads logits so greedy argmax has clear winners
    rope_freq_factors: bool = False  # write a Llama-3.1-style rope_freqs.weight (random factors in [1, 8])
    rope_linear_scale: float = 0.0   # > 0: linear RoPE scaling by this factor
    arch: str = "llama"              # llama, qwen2 (q/k/v biases), qwen3 (q/k norms), gemma3 (see torch_model.py)
    head_dim: int = 0                # 0: n_embd / n_head; Qwen3 and Gemma 3 set their own
    sliding_window: int = 0          # gemma3: window of its sliding layers (every 6th layer is global)
    chat_template: str | None = None  # None: SmolLM2's (ChatML)
    tied: bool = False               # no output.weight: logits from the embeddings (Qwen and Gemma's small models)


def _copy_tokenizer(writer: gguf.GGUFWriter, reader: gguf.GGUFReader, chat_template: str | None = None) -> int:
    n_vocab = 0
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for key in TOKENIZER_KEYS:
        field = reader.fields.get(key)
        if field is None or (key == "tokenizer.chat_template" and chat_template is not None):
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[1]
            writer.add_array(key, value) if sub != gguf.GGUFValueType.INT32 else writer.add_key_value(
                key, value, vtype, sub_type=sub)
            if key == "tokenizer.ggml.tokens":
                n_vocab = len(value)
        else:
            writer.add_key_value(key, value, vtype)
    return n_vocab


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved-pair rows (convert_hf_to_gguf's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_tiny_llama(path: str | Path, cfg: TinyConfig = TinyConfig()) -> dict[str, np.ndarray]:
    """Writes a random GGUF of `cfg.arch` to `path`; returns its weights (HF layout, GGUF names)."""
    reader = gguf.GGUFReader(str(models.embedded_default_path()))
    writer = gguf.GGUFWriter(str(path), cfg.arch)
    n_vocab = _copy_tokenizer(writer, reader, cfg.chat_template)
    head_dim = cfg.head_dim or cfg.n_embd // cfg.n_head
    writer.add_name(f"tiny-random-{cfg.arch}")
    if cfg.head_dim:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if cfg.sliding_window:
        writer.add_sliding_window(cfg.sliding_window)
    writer.add_context_length(cfg.n_ctx)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.n_ff)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(cfg.rope_base)
    if cfg.rope_linear_scale:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_linear_scale)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    rng = np.random.default_rng(cfg.seed)

    def w(*shape, scale=None):
        scale = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    E, F, kv, qd = cfg.n_embd, cfg.n_ff, cfg.n_head_kv * head_dim, cfg.n_head * head_dim
    # Gemma scales its embeddings by sqrt(E): smaller ones keep the residual stream comparable
    weights = {
        "token_embd.weight": w(n_vocab, E, scale=1.0 / np.sqrt(E) if cfg.arch == "gemma3" else 1.0),
        "output_norm.weight": norm(E),
        "output.weight": w(n_vocab, E, scale=cfg.logit_scale / np.sqrt(E)),
    }
    if cfg.tied:
        del weights["output.weight"]
    if cfg.rope_freq_factors:
        weights["rope_freqs.weight"] = rng.uniform(1.0, 8.0, head_dim // 2).astype(np.float32)
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        weights.update({
            p + "attn_norm.weight": norm(E),
            p + "attn_q.weight": w(qd, E),
            p + "attn_k.weight": w(kv, E),
            p + "attn_v.weight": w(kv, E),
            p + "attn_output.weight": w(E, qd),
            p + "ffn_norm.weight": norm(E),
            p + "ffn_gate.weight": w(F, E),
            p + "ffn_up.weight": w(F, E),
            p + "ffn_down.weight": w(E, F),
        })
        if cfg.arch == "qwen2":
            weights.update({p + f"attn_{x}.bias": (0.5 * rng.standard_normal(n)).astype(np.float32)
                            for x, n in (("q", qd), ("k", kv), ("v", kv))})
        if cfg.arch in ("qwen3", "gemma3"):
            weights.update({p + "attn_q_norm.weight": norm(head_dim), p + "attn_k_norm.weight": norm(head_dim)})
        if cfg.arch == "gemma3":
            weights.update({p + "post_attention_norm.weight": norm(E), p + "post_ffw_norm.weight": norm(E)})
    for name, arr in weights.items():
        if cfg.arch == "llama" and name.endswith("attn_q.weight"):  # only Llama's converter permutes
            arr = permute_qk(arr, cfg.n_head)
        elif cfg.arch == "llama" and name.endswith("attn_k.weight"):
            arr = permute_qk(arr, cfg.n_head_kv)
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


# One tiny model per family, each exercising what sets the family apart.
FAMILIES = {
    "llama": TinyConfig(),
    "qwen2": TinyConfig(arch="qwen2", tied=True),
    "qwen3": TinyConfig(arch="qwen3", head_dim=32, tied=True),  # head size != n_embd / n_head
    # 6 layers: 5 sliding (window 8, shorter than the prompts) and one global
    "gemma3": TinyConfig(arch="gemma3", head_dim=32, n_layer=6, sliding_window=8, tied=True, rms_eps=1e-6),
}
