"""Tiny random LoRA adapters and a float64 numpy reference forward pass, for exact tests.

The tiny models themselves (Llama, Qwen2, Qwen3, Gemma 3) are built by
mtllm_locally.bench.tiny_models, which the families bench shares. LoRA adapters here
are written the way llama.cpp's converter writes them (B rows of q/k permuted for
Llama), so the parity tests pin down exactly the layout the trainer's exporter must
produce.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from mtllm_locally.bench.tiny_models import FAMILIES, TinyConfig, build_tiny_llama, permute_qk  # noqa: F401

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
