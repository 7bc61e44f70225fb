"""Tiny random Llama GGUF models for fast, exact tests.

They reuse the real SmolLM2 tokenizer and chat template (copied from the embedded
model's GGUF), so prompts tokenize and render exactly as in production, while the
transformer is a few kilobytes of random weights that llama.cpp runs in
microseconds. Weights are float32 so a numpy reference forward pass can match them.

Weights are made in Hugging Face layout (what torch/PEFT train on) and written the
way llama.cpp's converter writes them: q/k rows permuted for llama.cpp's RoPE. LoRA
adapters are written the same way (B rows of q/k permuted likewise), so the parity
test pins down exactly the layout the trainer's exporter must produce.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from mtllm_locally import models

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


def _copy_tokenizer(writer: gguf.GGUFWriter, reader: gguf.GGUFReader) -> int:
    n_vocab = 0
    for key in TOKENIZER_KEYS:
        field = reader.fields.get(key)
        if field is None:
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
    """Writes a random Llama GGUF to `path`; returns its weights (HF layout, GGUF names)."""
    reader = gguf.GGUFReader(str(models.embedded_default_path()))
    writer = gguf.GGUFWriter(str(path), "llama")
    n_vocab = _copy_tokenizer(writer, reader)
    head_dim = cfg.n_embd // cfg.n_head
    writer.add_name("tiny-random-llama")
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

    E, F, kv = cfg.n_embd, cfg.n_ff, cfg.n_head_kv * head_dim
    weights = {
        "token_embd.weight": w(n_vocab, E, scale=1.0),
        "output_norm.weight": (1.0 + 0.1 * rng.standard_normal(E)).astype(np.float32),
        "output.weight": w(n_vocab, E, scale=cfg.logit_scale / np.sqrt(E)),
    }
    if cfg.rope_freq_factors:
        weights["rope_freqs.weight"] = rng.uniform(1.0, 8.0, head_dim // 2).astype(np.float32)
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        weights.update({
            p + "attn_norm.weight": (1.0 + 0.1 * rng.standard_normal(E)).astype(np.float32),
            p + "attn_q.weight": w(E, E),
            p + "attn_k.weight": w(kv, E),
            p + "attn_v.weight": w(kv, E),
            p + "attn_output.weight": w(E, E),
            p + "ffn_norm.weight": (1.0 + 0.1 * rng.standard_normal(E)).astype(np.float32),
            p + "ffn_gate.weight": w(F, E),
            p + "ffn_up.weight": w(F, E),
            p + "ffn_down.weight": w(E, F),
        })
    for name, arr in weights.items():
        if name.endswith("attn_q.weight"):
            arr = permute_qk(arr, cfg.n_head)
        elif name.endswith("attn_k.weight"):
            arr = permute_qk(arr, cfg.n_head_kv)
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


LORA_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def build_tiny_lora(path: str | Path, base: dict[str, np.ndarray], cfg: TinyConfig = TinyConfig(), *,
                    rank: int = 4, alpha: float = 8.0, seed: int = 1, strength: float = 1.0,
                    targets=LORA_TARGETS, architecture: str = "llama") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Writes a random LoRA adapter GGUF for the model whose HF-layout weights are
    `base`; returns {tensor name: (A (r, n_in), B (n_out, r))} in HF/PEFT layout."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    lora = {}
    for name, w in base.items():
        if not name.startswith("blk.") or name.split(".")[2] not in targets:
            continue
        n_out, n_in = w.shape
        a = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
        b = (rng.standard_normal((n_out, rank)) * strength / np.sqrt(rank)).astype(np.float32)
        lora[name] = (a, b)
        b_gguf = b
        if name.endswith("attn_q.weight"):
            b_gguf = permute_qk(b, cfg.n_head)
        elif name.endswith("attn_k.weight"):
            b_gguf = permute_qk(b, cfg.n_head_kv)
        writer.add_tensor(name + ".lora_a", a)
        writer.add_tensor(name + ".lora_b", b_gguf)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return lora


def reference_logits(weights: dict[str, np.ndarray], tokens: list[int], cfg: TinyConfig = TinyConfig(),
                     lora: dict | None = None, lora_scale: float = 1.0) -> np.ndarray:
    """Hugging Face-style Llama forward pass in float64 numpy (rotate-half RoPE on HF
    layout), with an optional LoRA: W x + scale * B (A x), scale = lora_scale * alpha / r
    folded in by the caller."""
    E, H, KV = cfg.n_embd, cfg.n_head, cfg.n_head_kv
    hd = E // H
    T = len(tokens)
    f = lambda a: a.astype(np.float64)

    def lin(name, h):
        y = h @ f(weights[name]).T
        if lora and name in lora:
            a, b = lora[name]
            y = y + lora_scale * ((h @ f(a).T) @ f(b).T)
        return y

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.rms_eps) * f(w)

    inv = cfg.rope_base ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, axis=-1)[:, None, :]

    def rope(x):  # x: (T, heads, hd)
        rot = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], axis=-1)
        return x * cos + rot * sin

    x = f(weights["token_embd.weight"])[tokens]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    if cfg.rope_freq_factors:
        weights["rope_freqs.weight"] = rng.uniform(1.0, 8.0, head_dim // 2).astype(np.float32)
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        h = rms(x, weights[p + "attn_norm.weight"])
        q = rope(lin(p + "attn_q.weight", h).reshape(T, H, hd))
        k = rope(lin(p + "attn_k.weight", h).reshape(T, KV, hd))
        v = lin(p + "attn_v.weight", h).reshape(T, KV, hd)
        k = np.repeat(k, H // KV, axis=1)
        v = np.repeat(v, H // KV, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, E)
        x = x + lin(p + "attn_output.weight", o)
        h = rms(x, weights[p + "ffn_norm.weight"])
        g = lin(p + "ffn_gate.weight", h)
        u = lin(p + "ffn_up.weight", h)
        x = x + lin(p + "ffn_down.weight", g / (1 + np.exp(-g)) * u)
    return rms(x, weights["output_norm.weight"]) @ f(weights["output.weight"]).T
