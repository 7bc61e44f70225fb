"""Model files: the valid tiny Llama with one or two mutations.

Each mutation is what a corrupt download, a buggy converter or a hostile file could
contain while staying a well-formed GGUF (metadata llama.cpp trusts, tensors whose
shapes or types disagree with it, another architecture's name on Llama tensors) or
not (truncated, bytes flipped, counts and lengths that lie). A case writes the file,
opens an Engine on it and, if that succeeds, runs a prompt and a chat request: a
file may only be refused with ModelLoadError (or fail a request cleanly), never crash.
"""

from __future__ import annotations

import copy
import functools
import math
import random
import struct

from . import gguf_file as g
from .context import HELLO
from .tiny import SHAPE, tiny_llama

NAN, INF = float("nan"), float("inf")
ARCHS = ("qwen2", "qwen3", "qwen2moe", "qwen3moe", "gemma", "gemma2", "gemma3", "gemma3n", "phi2", "phi3",
         "starcoder2", "falcon", "gpt2", "bert", "t5", "mamba", "rwkv6", "deepseek2", "olmo", "olmo2",
         "command-r", "chatglm", "granite", "llama4", "mistral3", "nemotron", "exaone", "stablelm", "mpt",
         "bloom", "baichuan", "internlm2", "minicpm", "arctic", "jamba", "bogus", "", "LLAMA", "llama\0x")
HPARAMS = (".context_length", ".embedding_length", ".block_count", ".feed_forward_length",
           ".attention.head_count", ".attention.head_count_kv", ".rope.dimension_count", ".rope.freq_base",
           ".attention.layer_norm_rms_epsilon", ".vocab_size")
U32_EXTREMES = (0, 1, 2, 3, 7, 64, 511, 512, 513, 4096, 65536, 2**31 - 1, 2**31, 2**32 - 1)
F32_EXTREMES = (NAN, INF, -INF, -1.0, 0.0, -0.0, 1e-45, 1e38, 1e30)


@functools.lru_cache(maxsize=1)
def _base() -> g.GGUF:
    return tiny_llama()


def base_model() -> g.GGUF:
    """A fresh editable copy of the valid tiny model."""
    return copy.deepcopy(_base())


def _arch(f: g.GGUF) -> str:
    kv = f.get("general.architecture")
    try:
        return g._Cursor(kv.raw).string().decode() if kv is not None and kv.vtype == g.STR else "llama"
    except Exception:  # noqa: BLE001 - a mutated name
        return "llama"


def _resize(data: bytes, n: int, r: random.Random) -> bytes:
    if n <= len(data):
        return data[:n]
    return data + r.randbytes(min(n - len(data), 64 << 20))


# ---------------------------------------------------------------- metadata
def m_block_count(f, r):
    v = r.choice(U32_EXTREMES)
    f.set(_arch(f) + ".block_count", g.U32, v)
    return "block_count", f"block_count={v} (tensors for {SHAPE.n_layer} blocks)"


def m_experts(f, r):
    a = _arch(f)
    n, used = r.choice((0, 1, 2, 8, 64, 256, 257, 2**31 - 1, 2**32 - 1)), r.choice((0, 1, 2, 8, 300, 2**32 - 1))
    which = r.choice(("both", "count", "used"))
    if which in ("both", "count"):
        f.set(a + ".expert_count", g.U32, n)
    if which in ("both", "used"):
        f.set(a + ".expert_used_count", g.U32, used)
    return "experts_on_dense", f"dense model with {which}: expert_count={n} expert_used_count={used}"


def m_rope_scaling(f, r):
    a = _arch(f)
    typ = r.choice(("bogus", "", "yarn", "linear", "longrope", "none", "llama3", "\udcff", "linear\0x"))
    f.set(a + ".rope.scaling.type", g.STR, typ)
    extra = []
    for key, v in ((".rope.scaling.factor", r.choice((None, 0.0, -1.0, NAN, INF, 1e38, 4.0))),
                   (".rope.scaling.original_context_length", r.choice((None, 0, 1, 2**32 - 1))),
                   (".rope.scaling.attn_factor", r.choice((None, NAN, 0.0, -1.0)))):
        if v is not None:
            f.set(a + key, g.F32 if isinstance(v, float) else g.U32, v)
            extra.append(f"{key[1:]}={v}")
    return "rope_scaling", f"rope.scaling.type={typ!r} " + " ".join(extra)


def m_norm_eps(f, r):
    v = r.choice(F32_EXTREMES)
    key = r.choice((".attention.layer_norm_rms_epsilon", ".attention.layer_norm_epsilon"))
    f.set(_arch(f) + key, g.F32, v)
    return "norm_eps", f"{key[1:]}={v}"


def m_heads(f, r):
    a = _arch(f)
    h, kv = r.choice((0, 1, 3, 5, 7, 8, 64, 2**31 - 1, 2**32 - 1)), r.choice((0, 1, 3, 4, 8, 2**32 - 1, None))
    f.set(a + ".attention.head_count", g.U32, h)
    if kv is not None:
        f.set(a + ".attention.head_count_kv", g.U32, kv)
    return "head_counts", f"head_count={h} head_count_kv={kv} (n_embd {SHAPE.n_embd})"


def m_per_layer_array(f, r):
    key = r.choice((".attention.head_count", ".attention.head_count_kv", ".feed_forward_length"))
    n = r.choice((0, 1, SHAPE.n_layer, SHAPE.n_layer + 1, 513, 5000))
    vals = [r.choice((0, 1, 3, 4, 2**32 - 1)) for _ in range(n)]
    f.set(_arch(f) + key, g.ARR, vals, g.U32)
    return "per_layer_array", f"{key[1:]} as an array of {n} values {vals[:4]}..."


def m_sizes(f, r):
    key = r.choice((".embedding_length", ".feed_forward_length", ".rope.dimension_count", ".vocab_size",
                    ".context_length", ".attention.key_length", ".attention.value_length"))
    v = r.choice(U32_EXTREMES + (16, 31, 48))
    f.set(_arch(f) + key, g.U32, v)
    return "size_" + key.rsplit(".", 1)[-1], f"{key[1:]}={v}"


def m_freq_base(f, r):
    v = r.choice(F32_EXTREMES)
    f.set(_arch(f) + ".rope.freq_base", g.F32, v)
    return "rope_freq_base", f"rope.freq_base={v}"


def m_key_type(f, r):
    key = _arch(f) + r.choice(HPARAMS)
    vtype, raw, what = r.choice((
        (g.STR, g.encode_value(g.STR, "12"), "string '12'"),
        (g.F64, g.encode_value(g.F64, 2.0), "f64 2.0"),
        (g.I8, g.encode_value(g.I8, -1), "i8 -1"),
        (g.BOOL, g.encode_value(g.BOOL, True), "bool"),
        (g.ARR, g.encode_value(g.ARR, ["a", "b"], g.STR), "array of strings"),
        (g.ARR, g.encode_value(g.ARR, [], g.U32), "empty array"),
        (g.U64, g.encode_value(g.U64, 2**64 - 1), "u64 max"),
        (99, b"\0" * 8, "type id 99"),
    ))
    f.set_raw(key, vtype, raw)
    return "key_type", f"{key} stored as {what}"


def m_arch_name(f, r):
    new = r.choice(ARCHS)
    rename = r.random() < 0.7
    f.set("general.architecture", g.STR, new)
    if rename:
        f.rename_prefix("llama", new)
    return "architecture", f"general.architecture={new!r} on llama tensors ({'keys renamed' if rename else 'llama.* keys kept'})"


def m_arch_missing(f, r):
    how = r.choice(("drop", "int", "empty array"))
    if how == "drop":
        f.drop("general.architecture")
    elif how == "int":
        f.set("general.architecture", g.U32, 5)
    else:
        f.set("general.architecture", g.ARR, [], g.STR)
    return "architecture_key", f"general.architecture: {how}"


def m_tokenizer(f, r):
    what = r.choice(("drop tokens", "drop merges", "drop token_type", "drop model", "drop pre", "model",
                     "pre", "token_type short", "special id", "add_bos type", "tokens as u32", "bad utf8 token",
                     "empty tokens", "merges garbage", "drop all"))
    if what.startswith("drop") and what != "drop all":
        key = "tokenizer.ggml." + what.split()[1]
        f.drop(key)
        return "tokenizer_missing", f"{key} removed"
    if what == "drop all":
        f.kvs = [kv for kv in f.kvs if not str(kv.key).startswith("tokenizer.")]
        return "tokenizer_missing", "every tokenizer.* key removed"
    if what == "model":
        v = r.choice(("bogus", "", "none", "bert", "t5", "rwkv", "plamo2", "ugm", "llama"))
        f.set("tokenizer.ggml.model", g.STR, v)
        return "tokenizer_model", f"tokenizer.ggml.model={v!r} with the gpt2 vocab"
    if what == "pre":
        v = r.choice(("bogus", "", "llama3", "qwen2", "default", "\0"))
        f.set("tokenizer.ggml.pre", g.STR, v)
        return "tokenizer_pre", f"tokenizer.ggml.pre={v!r}"
    if what == "token_type short":
        n = r.choice((0, 1, 100))
        f.set("tokenizer.ggml.token_type", g.ARR, [1] * n, g.I32)
        return "tokenizer_token_type", f"token_type has {n} entries (vocab 49152)"
    if what == "special id":
        key = "tokenizer.ggml." + r.choice(("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id",
                                            "eot_token_id", "sep_token_id"))
        v = r.choice((49152, 49153, 10**9, 2**31 - 1, 2**32 - 1))
        f.set(key, g.U32, v)
        return "tokenizer_special_id", f"{key}={v} (vocab 49152)"
    if what == "add_bos type":
        f.set("tokenizer.ggml.add_bos_token", g.STR, "yes")
        return "tokenizer_key_type", "add_bos_token stored as a string"
    if what == "tokens as u32":
        f.set("tokenizer.ggml.tokens", g.ARR, list(range(49152)), g.U32)
        return "tokenizer_key_type", "tokens stored as an array of u32"
    toks = g.decode_str_array(f.get("tokenizer.ggml.tokens").raw)
    if what == "bad utf8 token":
        for _ in range(r.randint(1, 50)):
            toks[r.randrange(len(toks))] = r.choice((b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"\0", b""))
        f.set("tokenizer.ggml.tokens", g.ARR, toks, g.STR)
        return "tokenizer_tokens", "tokens with invalid UTF-8, NUL and empty strings"
    if what == "empty tokens":
        n = r.choice((0, 1, 10))
        f.set("tokenizer.ggml.tokens", g.ARR, toks[:n], g.STR)
        return "tokenizer_tokens", f"tokens array cut to {n} entries"
    merges = [r.choice((b"a", b"", b"x y z", b"\xff \xfe", b"  ", b"zz qq")) for _ in range(r.randint(1, 200))]
    f.set("tokenizer.ggml.merges", g.ARR, merges, g.STR)
    return "tokenizer_merges", "merges replaced by malformed pairs"


def m_chat_template(f, r):
    v = r.choice((b"\xff\xfe{{ messages }}", b"{% for m in messages %}{{ m['content'] }}\xc3{% endfor %}",
                  b"{% if %}", b"{{ raise_exception('no') }}",
                  b"{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                  b"{{ lipsum(n=1000000) }}", b"{{ ''.__class__.__mro__[1].__subclasses__() }}"))
    f.set_raw("tokenizer.chat_template", g.STR, struct.pack("<Q", len(v)) + v)
    return "chat_template", f"tokenizer.chat_template={v[:60]!r}"


def m_alignment(f, r):
    v = r.choice((0, 1, 3, 7, 33, 2**31, 2**32 - 1))
    f.set("general.alignment", g.U32, v)
    return "alignment", f"general.alignment={v}"


def m_version(f, r):
    f.version = r.choice((0, 1, 2, 4, 2**32 - 1))
    return "version", f"GGUF version {f.version}"


def m_lying_lengths(f, r):
    what = r.choice(("string", "array", "nested array", "key"))
    if what == "string":
        n = r.choice((2**62, 2**64 - 1, 10**9))
        f.set_raw("general.name", g.STR, struct.pack("<Q", n) + b"abc")
        return "lying_length", f"general.name claims {n} bytes"
    if what == "array":
        n = r.choice((2**61, 2**64 - 1, 10**9))
        f.set_raw("general.tags", g.ARR, struct.pack("<IQ", g.U32, n) + b"\0" * 8)
        return "lying_length", f"an array claims {n} items"
    if what == "nested array":
        inner = g.encode_value(g.ARR, [1, 2], g.U32)
        f.set_raw("general.tags", g.ARR, struct.pack("<IQ", g.ARR, 3) + inner * 3)
        return "nested_array", "an array of arrays"
    key = r.choice((b"", b"\xff\xfe", b"k" * (1 << 20)))
    f.kvs.insert(1, g.KV(key, g.U32, struct.pack("<I", 1)))
    return "key_name", f"a key named {key[:8]!r} ({len(key)} bytes)"


def m_counts(f, r):
    which = r.choice(("tensors", "kv"))
    delta = r.choice((1, -1, 5, 2**31, 2**63, 2**64 - 1))
    if which == "tensors":
        f.n_tensors = len(f.tensors) + delta if delta < 2**31 else delta
    else:
        f.n_kv = len(f.kvs) + delta if delta < 2**31 else delta
    return "header_counts", f"header claims {which} count off by/at {delta}"


def m_duplicate(f, r):
    if r.random() < 0.5:
        t = r.choice(f.tensors)
        f.tensors.append(copy.copy(t))
        return "duplicate", f"tensor {t.name} twice"
    kv = f.kvs[r.randrange(len(f.kvs) // 4 + 1)]
    f.kvs.append(g.KV(kv.key, g.U32, struct.pack("<I", 7)))
    return "duplicate", f"key {kv.key} twice (second a u32)"


# ---------------------------------------------------------------- tensors
def m_missing_tensor(f, r):
    t = r.choice(f.tensors)
    f.tensors.remove(t)
    return "missing_tensor", f"tensor {t.name} removed"


def m_extra_tensor(f, r):
    name = r.choice(("blk.0.bogus.weight", "blk.7.attn_q.weight", "output.weight", "rope_freqs.weight",
                     "blk.0.ffn_gate_exps.weight", "blk.0.attn_q.bias"))
    n = r.choice((1, 16, 32, 1024))
    f.tensors.append(g.Tensor(name, 0, [n], r.randbytes(4 * n)))
    return "extra_tensor", f"extra tensor {name} [{n}]"


def m_tensor_shape(f, r):
    t = r.choice(f.tensors)
    old = list(t.ne)
    how = r.choice(("swap", "grow", "shrink", "zero", "3d", "4d", "5d", "0d", "huge"))
    if how == "swap":
        t.ne = list(reversed(t.ne))
    elif how == "grow":
        t.ne = [d + r.choice((1, 32)) if i == 0 else d for i, d in enumerate(t.ne)]
    elif how == "shrink":
        t.ne = [max(1, d // 2) for d in t.ne]
    elif how == "zero":
        t.ne = [0] + t.ne[1:]
    elif how == "3d":
        t.ne = t.ne + [r.choice((1, 2))]
    elif how == "4d":
        t.ne = t.ne + [1] * (4 - len(t.ne)) if len(t.ne) < 4 else t.ne
    elif how == "5d":
        t.ne = t.ne + [1] * (5 - len(t.ne))
    elif how == "0d":
        t.ne = []
    else:
        t.ne = [2**40] + t.ne[1:]
    resized = how != "huge" and r.random() < 0.7
    if resized and len(t.ne) <= 4:
        t.data = _resize(t.data, g.tensor_nbytes(t.ggml_type, t.ne), r)
    return "tensor_shape", f"{t.name} shape {old} -> {t.ne} ({how}, data {'resized' if resized else 'as before'})"


def m_tensor_type(f, r):
    t = r.choice(f.tensors)
    new = r.choice(tuple(g.GGML_TYPES) + ("unknown",))
    if new == "unknown":
        t.ggml_type = r.choice((4, 5, 16, 31, 39, 100, 2**31, 2**32 - 1))
        return "tensor_type", f"{t.name} has ggml type id {t.ggml_type}"
    tid, size, block = g.GGML_TYPES[new]
    t.ggml_type = tid
    if math.prod(t.ne) % block == 0 and t.ne[0] % block == 0:
        t.data = _resize(t.data, g.tensor_nbytes(tid, t.ne), r)
        return "tensor_type", f"{t.name} as {new} (random data of the right size)"
    return "tensor_type", f"{t.name} as {new} (row of {t.ne[0]} not a multiple of its block {block})"


def m_tensor_offset(f, r):
    t = r.choice(f.tensors)
    how = r.choice(("misaligned", "overlap", "past end", "huge"))
    t.offset = {"misaligned": 1, "overlap": 0, "past end": 64 << 20, "huge": 2**63}[how]
    return "tensor_offset", f"{t.name} offset {t.offset} ({how})"


def m_tensor_name(f, r):
    t = r.choice(f.tensors)
    t.name = r.choice((b"", b"\xff\xfe", b"x" * 100, b"blk.0.attn_q.weight\0junk"))
    return "tensor_name", f"a tensor named {t.name[:24]!r} ({len(t.name)} bytes)"


def m_weights_nonfinite(f, r):
    import numpy as np

    t = r.choice([t for t in f.tensors if t.ggml_type == 0])
    v = r.choice((NAN, INF, -INF, 3e38))
    t.data = np.full(len(t.data) // 4, v, dtype=np.float32).tobytes()
    return "weights_nonfinite", f"{t.name} filled with {v}"


# ---------------------------------------------------------------- bytes
def b_truncate(data: bytes, f, r):
    cut = r.choice((r.randrange(0, 32), r.randrange(0, f.layout["data"]), r.randrange(f.layout["data"], len(data))))
    return data[:cut], "truncated", f"truncated to {cut} of {len(data)} bytes"


def b_flip(data: bytes, f, r):
    buf = bytearray(data)
    regions = ((0, 24), (24, 24 + 600), (f.layout["tensor_info"], f.layout["data"]))
    k = r.randint(1, 8)
    where = []
    for _ in range(k):
        lo, hi = r.choice(regions)
        i = r.randrange(lo, hi)
        buf[i] ^= 1 << r.randrange(8) if r.random() < 0.5 else r.randrange(1, 256)
        where.append(i)
    return bytes(buf), "byte_flips", f"{k} header bytes changed at {where}"


MUTATIONS = (m_block_count, m_experts, m_rope_scaling, m_norm_eps, m_heads, m_per_layer_array, m_sizes,
             m_freq_base, m_key_type, m_arch_name, m_arch_name, m_arch_missing, m_tokenizer, m_tokenizer,
             m_chat_template, m_alignment, m_version, m_lying_lengths, m_counts, m_duplicate, m_missing_tensor,
             m_extra_tensor, m_tensor_shape, m_tensor_shape, m_tensor_type, m_tensor_type, m_tensor_offset,
             m_tensor_name, m_weights_nonfinite)
BYTE_MUTATIONS = (b_truncate, b_flip)


def mutate(f: g.GGUF, r: random.Random, mutations=MUTATIONS, byte_mutations=BYTE_MUTATIONS) -> tuple[bytes, str, str]:
    """Apply 1-2 mutations (or one byte-level one); returns (file bytes, label, desc)."""
    if r.random() < 0.15:
        data = f.to_bytes()
        data, label, desc = r.choice(byte_mutations)(data, f, r)
        return data, label, desc
    labels, descs = [], []
    for _ in range(1 if r.random() < 0.75 else 2):
        try:
            label, desc = r.choice(mutations)(f, r)
        except (IndexError, StopIteration):  # an earlier mutation removed what this one edits
            continue
        labels.append(label)
        descs.append(desc)
    return f.to_bytes(), "+".join(labels) or "unmutated", "; ".join(descs) or "the valid model"


def make(r: random.Random):
    f = base_model()
    data, label, desc = mutate(f, r)
    n_ctx = 0 if "context_length" in label else 256

    def run(ctx):
        path = ctx.path()
        with open(path, "wb") as fh:
            fh.write(data)
        eng = ctx.new_engine(path, n_ctx=n_ctx)
        eng.generate("Hello world, this is", max_tokens=4)
        eng.generate(messages=HELLO, max_tokens=4)

    return label, desc + f" (n_ctx={n_ctx})", run
