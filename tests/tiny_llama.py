"""Tiny random Llama GGUF models for fast, exact tests.

They reuse the real SmolLM2 tokenizer and chat template (copied from the embedded
model's GGUF), so prompts tokenize and render exactly as in production, while the
transformer is a few kilobytes of random weights that llama.cpp runs in
microseconds. Weights are float32 so a numpy reference forward pass can match them.
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


def build_tiny_llama(path: str | Path, cfg: TinyConfig = TinyConfig()) -> dict[str, np.ndarray]:
    """Writes a random Llama GGUF to `path`; returns its weights (GGUF layout)."""
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
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights
