"""The valid starting points every file mutation begins from.

A tiny random Llama (2 layers, 32-wide, the real SmolLM2 tokenizer and chat template
copied from the embedded model, so prompts tokenize as in production) and a LoRA
adapter that fits it. The weights are fixed (seed 0): a case's seed decides only the
mutation. Token embeddings are F16 and tied to the output, so a model file is ~3 MB
and loads in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import gguf_file as g


@dataclass(frozen=True)
class TinyShape:
    n_embd: int = 32
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 64
    n_ctx: int = 256

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


SHAPE = TinyShape()
LORA_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def weight_shapes(s: TinyShape = SHAPE, n_vocab: int = 0) -> dict[str, tuple[int, ...]]:
    """numpy shapes (rows, cols) of every tensor of the tiny model."""
    E, F, KV = s.n_embd, s.n_ff, s.n_head_kv * s.head_dim
    out = {"token_embd.weight": (n_vocab, E), "output_norm.weight": (E,)}
    for i in range(s.n_layer):
        p = f"blk.{i}."
        out.update({p + "attn_norm.weight": (E,), p + "attn_q.weight": (E, E), p + "attn_k.weight": (KV, E),
                    p + "attn_v.weight": (KV, E), p + "attn_output.weight": (E, E), p + "ffn_norm.weight": (E,),
                    p + "ffn_gate.weight": (F, E), p + "ffn_up.weight": (F, E), p + "ffn_down.weight": (E, F)})
    return out


def tiny_llama(s: TinyShape = SHAPE, arch: str = "llama") -> g.GGUF:
    """A valid tiny Llama as an editable GGUF."""
    tok = g.default_tokenizer()
    n_vocab = g.n_vocab(tok)
    f = g.GGUF()
    f.set("general.architecture", g.STR, arch)
    f.set("general.name", g.STR, "fuzz-tiny-llama")
    f.set("general.file_type", g.U32, 0)
    for key, vtype, value in ((".context_length", g.U32, s.n_ctx), (".embedding_length", g.U32, s.n_embd),
                              (".block_count", g.U32, s.n_layer), (".feed_forward_length", g.U32, s.n_ff),
                              (".attention.head_count", g.U32, s.n_head),
                              (".attention.head_count_kv", g.U32, s.n_head_kv),
                              (".rope.dimension_count", g.U32, s.head_dim), (".rope.freq_base", g.F32, 10000.0),
                              (".attention.layer_norm_rms_epsilon", g.F32, 1e-5), (".vocab_size", g.U32, n_vocab)):
        f.set(arch + key, vtype, value)
    f.kvs.extend(g.KV(kv.key, kv.vtype, kv.raw) for kv in tok)
    rng = np.random.default_rng(0)
    for name, shape in weight_shapes(s, n_vocab).items():
        if len(shape) == 1:
            arr = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            arr = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        if name == "token_embd.weight":
            arr = (arr * np.sqrt(shape[-1])).astype(np.float16)
        f.add_array(name, arr)
    return f


def tiny_lora(s: TinyShape = SHAPE, rank: int = 4, alpha: float = 8.0, seed: int = 1, arch: str = "llama",
              targets=LORA_TARGETS) -> g.GGUF:
    """A valid random LoRA adapter for `tiny_llama(s)` (the layout learn/export.py writes)."""
    rng = np.random.default_rng(seed)
    f = g.GGUF()
    f.set("general.architecture", g.STR, arch)
    f.set("general.type", g.STR, "adapter")
    f.set("adapter.type", g.STR, "lora")
    f.set("adapter.lora.alpha", g.F32, alpha)
    for name, shape in weight_shapes(s).items():
        if not name.startswith("blk.") or name.split(".")[2] not in targets:
            continue
        n_out, n_in = shape
        f.add_array(name + ".lora_a", (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32))
        f.add_array(name + ".lora_b", (rng.standard_normal((n_out, rank)) * 0.1).astype(np.float32))
    return f


def lora_for(model_path: str, rank: int = 4, seed: int = 0, strength: float = 0.02,
             targets=LORA_TARGETS) -> g.GGUF:
    """A valid random LoRA adapter for any Llama-layout GGUF model (e.g. the default)."""
    import gguf  # the reader only; the bench's default-model adapters

    reader = gguf.GGUFReader(model_path)
    arch = reader.fields["general.architecture"].contents()
    rng = np.random.default_rng(seed)
    f = g.GGUF()
    f.set("general.architecture", g.STR, arch)
    f.set("general.type", g.STR, "adapter")
    f.set("adapter.type", g.STR, "lora")
    f.set("adapter.lora.alpha", g.F32, float(rank))
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in targets:
            n_in, n_out = int(t.shape[0]), int(t.shape[1])
            f.add_array(t.name + ".lora_a", (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32))
            f.add_array(t.name + ".lora_b", (rng.standard_normal((n_out, rank)) * strength).astype(np.float32))
    return f
