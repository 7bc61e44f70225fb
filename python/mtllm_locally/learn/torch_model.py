"""The served model in torch, built from exactly the GGUF file the engine serves.

We read the GGUF with the `gguf` package and dequantize its tensors ourselves rather
than going through transformers' GGUF loader: the weights are then bit-for-bit the
served ones (no re-download, no config lookup on a hub) and the model is a page of
code (nanoGPT-style). Module names follow the Hugging Face class of each family
(`model.layers.N.self_attn.q_proj`, ...), so PEFT targets and saves it exactly as it
would the HF model; GGUF <-> HF tensor names come from gguf-py's own tables.

Families (one decoder, a few switches, each one a documented difference):
  llama   TinyLlama, SmolLM, Llama 2/3.x, Mistral-style GQA; RoPE frequency factors
          (Llama 3.1+'s `rope_freqs.weight`) and linear RoPE scaling. GGUF stores q/k rows
          permuted for llama.cpp's interleaved RoPE: undone here, redone on export.
  qwen2   Qwen2 / Qwen2.5: biases on q, k, v; rotate-half RoPE (no permutation).
  qwen3   Qwen3 dense: RMSNorm over each head of q and k before RoPE; head size from
          `attention.key_length`, not n_embd / n_head.
  gemma3  Gemma 3 text: embeddings scaled by sqrt(n_embd), four norms per block (the
          attention and MLP outputs are normed too), q/k head norms, GELU (tanh), sliding-
          window layers (every 6th global by default) whose RoPE has its own base. GGUF
          stores Gemma's norms as 1 + w (llama.cpp multiplies by the stored value); so do we.
Other architectures, RoPE scalings and tensors we do not know raise: a model we would
train silently wrong is worse than one we refuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidRequestError, ModelLoadError

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
# What each family needs, by the GGUF's `general.architecture`.
QK_PERMUTED = frozenset({"llama"})  # converter permuted q/k rows for llama.cpp's interleaved RoPE
QKV_BIAS = frozenset({"qwen2"})
QK_NORM = frozenset({"qwen3", "gemma3"})
GEMMA = frozenset({"gemma3"})       # scaled embeddings, sandwich norms, GELU, sliding windows
HF_CLASS = MappingProxyType({"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                             "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"})


@dataclass(frozen=True)
class ModelShape:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int
    rope_base: float
    rms_eps: float
    tied_embeddings: bool
    head_dim: int
    rope_scale: float = 1.0  # linear RoPE scaling: positions are divided by this
    sliding_window: int = 0  # > 0: the layers in `sliding_layers` attend to this many positions
    sliding_layers: tuple[bool, ...] = ()
    rope_base_sliding: float = 10000.0  # Gemma's sliding layers use their own RoPE base, unscaled
    attn_scale: float = 0.0  # 0: 1/sqrt(head_dim)

    @property
    def permuted_qk(self) -> bool:
        return self.arch in QK_PERMUTED

    @property
    def gemma(self) -> bool:
        return self.arch in GEMMA

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_window) and self.sliding_layers[layer]


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp interleaved-pair rows -> HF rotate-half rows (inverse of convert_hf_to_gguf's permute)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved-pair rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        if x.dtype == torch.float32:  # one fused kernel (forward and backward) instead of six
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


class Attention(nn.Module):
    def __init__(self, c: ModelShape):
        super().__init__()
        self.c = c
        bias = c.arch in QKV_BIAS
        self.q_proj = nn.Linear(c.n_embd, c.n_head * c.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.n_embd, c.n_head_kv * c.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.n_embd, c.n_head_kv * c.head_dim, bias=bias)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.n_embd, bias=False)
        if c.arch in QK_NORM:
            self.q_norm = RMSNorm(c.head_dim, c.rms_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_eps)
        self.scale = c.attn_scale or 1.0 / math.sqrt(c.head_dim)

    # The trainer may set this to one function computing q, k and v together (lora_linear.py).
    project_qkv = None

    def project(self, x):
        if self.project_qkv is not None:
            return self.project_qkv(x)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def heads(self, q, k, v, B, T, rope):
        """Rows (B*T or B, T, ...) of q, k, v -> (B, heads, T, head_dim), normed and rotated."""
        c = self.c
        q = q.reshape(B, T, c.n_head, c.head_dim)
        k = k.reshape(B, T, c.n_head_kv, c.head_dim)
        if c.arch in QK_NORM:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.reshape(B, T, c.n_head_kv, c.head_dim).transpose(1, 2)
        return _rope(q, *rope), _rope(k, *rope), v

    def sdpa(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                              enable_gqa=self.c.n_head != self.c.n_head_kv)

    def forward(self, x, rope, mask):
        B, T, _ = x.shape
        y = self.sdpa(*self.heads(*self.project(x), B, T, rope), mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def _rope(x, cos, sin):
    """HF rotate-half RoPE: x*cos + rotate_half(x)*sin, with rotate_half(x) = cat(-x2, x1)
    written as roll(x) times a sin whose first half is negated (see DecoderForCausalLM.rope)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


class MLP(nn.Module):
    def __init__(self, c: ModelShape):
        super().__init__()
        self.gate_proj = nn.Linear(c.n_embd, c.n_ff, bias=False)
        self.up_proj = nn.Linear(c.n_embd, c.n_ff, bias=False)
        self.down_proj = nn.Linear(c.n_ff, c.n_embd, bias=False)
        self.gelu = c.gemma

    def forward(self, x):
        gate = self.gate_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block. Gemma also norms each sub-layer's output before adding it
    ("sandwich"), and its pre-MLP norm is `pre_feedforward_layernorm`, where Llama's is
    `post_attention_layernorm`: the names are HF's, the roles differ."""

    def __init__(self, c: ModelShape, index: int):
        super().__init__()
        self.sliding = c.is_sliding(index)
        self.sandwich = c.gemma
        self.input_layernorm = RMSNorm(c.n_embd, c.rms_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.n_embd, c.rms_eps)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(c.n_embd, c.rms_eps)
            self.post_feedforward_layernorm = RMSNorm(c.n_embd, c.rms_eps)
        self.mlp = MLP(c)

    def add_attention(self, x, y):
        return x + (self.post_attention_layernorm(y) if self.sandwich else y)

    def add_mlp(self, x):
        if self.sandwich:
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x, geometry):
        rope, mask = geometry[self.sliding]
        return self.add_mlp(self.add_attention(x, self.self_attn(self.input_layernorm(x), rope, mask)))

    def forward_shared_prefix(self, x, P, B, S, geometry, keep=None):
        """x holds the rows of one prefix (P tokens, computed once) followed by the B
        continuations of it (S tokens each), flat: (P + B*S, E). Every projection runs once
        on all rows; only attention sees them apart, each continuation attending to the
        shared prefix's keys and values and to its own. `keep` (row indices): return only
        those rows, skipping the output projection and MLP of the others (the last block
        needs every row's keys and values, but only the loss rows' outputs)."""
        a = self.self_attn
        rope_p, rope_s, mask_p, mask_s = geometry[self.sliding]
        q, k, v = a.project(self.input_layernorm(x))
        pre, suf = slice(0, P), slice(P, None)
        qp, kp, vp = a.heads(q[pre], k[pre], v[pre], 1, P, rope_p)
        qs, ks, vs = a.heads(q[suf], k[suf], v[suf], B, S, rope_s)
        ks = torch.cat([kp.expand(B, -1, -1, -1), ks], dim=2)
        vs = torch.cat([vp.expand(B, -1, -1, -1), vs], dim=2)
        yp, ys = a.sdpa(qp, kp, vp, mask_p), a.sdpa(qs, ks, vs, mask_s)
        y = torch.cat([yp.transpose(1, 2).reshape(P, -1), ys.transpose(1, 2).reshape(B * S, -1)])
        if keep is not None:
            x, y = x[keep], y[keep]
        return self.add_mlp(self.add_attention(x, a.o_proj(y)))


class Backbone(nn.Module):
    def __init__(self, c: ModelShape):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.n_vocab, c.n_embd)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layer))
        self.norm = RMSNorm(c.n_embd, c.rms_eps)


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """(Q, K) bool: causal, and within `window` positions when window > 0 (llama.cpp's
    standard SWA masks a key when q - k >= window)."""
    d = q_pos[:, None] - k_pos[None, :]
    return (d >= 0) & (d < window) if window else d >= 0


class DecoderForCausalLM(nn.Module):
    def __init__(self, c: ModelShape):
        super().__init__()
        self.config = c
        self.model = Backbone(c)
        self.lm_head = nn.Linear(c.n_embd, c.n_vocab, bias=False)
        # llama.cpp divides each RoPE frequency's angle by its factor (rope_freqs.weight, Llama 3.1+)
        self.register_buffer("rope_freqs", torch.ones(c.head_dim // 2), persistent=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(ids)
        return x * math.sqrt(self.config.n_embd) if self.config.gemma else x

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection of hidden states (N, E) -> logits (N, V), float32."""
        return self.lm_head(self.model.norm(h)).float()

    def hidden_states(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, E), after the final norm; logits are computed by the
        caller only where needed."""
        return self.model.norm(self.run_layers(self.embed(ids), attention_mask, 0, self.config.n_layer))

    def rope(self, pos: torch.Tensor, sliding: bool, dtype):
        c = self.config
        base, scale = (c.rope_base_sliding, 1.0) if sliding else (c.rope_base, c.rope_scale)
        inv = base ** (-torch.arange(0, c.head_dim, 2, device=pos.device, dtype=torch.float32) / c.head_dim)
        ang = (pos.float() / scale)[:, None] * (inv / self.rope_freqs.float())[None, :]
        return (torch.cat([ang.cos(), ang.cos()], -1)[None, None].to(dtype),
                torch.cat([-ang.sin(), ang.sin()], -1)[None, None].to(dtype))

    def _kinds(self) -> set[bool]:
        return {layer.sliding for layer in self.model.layers}

    def run_shared_prefix(self, xp: torch.Tensor, xs: torch.Tensor, suffix_mask: torch.Tensor,
                          rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
        """All blocks on a shared prefix xp (1, P, E) and right-padded continuations xs
        (B, S, E); returns the continuations' hidden states (B, S, E), or with `rows` and
        `cols` only those positions' (N, E). Same result as running each full sequence,
        with the prefix's compute done once instead of B times."""
        P, (B, S, E) = xp.shape[1], xs.shape
        dev = xs.device
        pos_p, pos_s = torch.arange(P, device=dev), torch.arange(P, P + S, device=dev)
        keys = torch.cat([torch.ones(B, P, dtype=torch.bool, device=dev), suffix_mask.bool()], 1)
        geometry = {}
        for sliding in self._kinds():
            window = self.config.sliding_window if sliding else 0
            mask_p = _allowed(pos_p, pos_p, window)[None, None]
            mask_s = _allowed(pos_s, torch.cat([pos_p, pos_s]), window)[None, None] & keys[:, None, None, :]
            geometry[sliding] = (self.rope(pos_p, sliding, xp.dtype), self.rope(pos_s, sliding, xs.dtype),
                                 mask_p, mask_s)
        x = torch.cat([xp.reshape(P, E), xs.reshape(B * S, E)])
        keep = None if rows is None else P + rows * S + cols
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            x = layer.forward_shared_prefix(x, P, B, S, geometry, keep if i == last else None)
        return x if keep is not None else x[P:].view(B, S, E)

    def run_layers(self, x: torch.Tensor, attention_mask: torch.Tensor | None, start: int, end: int) -> torch.Tensor:
        """Blocks start..end-1 on hidden states x (B, T, E). With right padding a real
        token never sees a pad (causal mask), so a layer's output for an example does
        not depend on the batch it was computed in: the trainer caches frozen layers."""
        T = x.shape[1]
        pos = torch.arange(T, device=x.device)
        geometry = {}
        for sliding in {layer.sliding for layer in self.model.layers[start:end]}:
            mask = _allowed(pos, pos, self.config.sliding_window if sliding else 0)[None, None]
            if attention_mask is not None:
                mask = mask & attention_mask[:, None, None, :].bool()
            geometry[sliding] = (self.rope(pos, sliding, x.dtype), mask)
        for layer in self.model.layers[start:end]:
            x = layer(x, geometry)
        return x

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(ids)).float()


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return f.contents() if f is not None else default


def read_config(reader: gguf.GGUFReader) -> ModelShape:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise InvalidRequestError(f"cannot train architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)} "
                                  "(the engine still serves it)")

    def field(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    tensors = {t.name: t for t in reader.tensors}
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise InvalidRequestError("GGUF has no token_embd.weight")
    n_embd = int(field("embedding_length"))
    n_head = int(field("attention.head_count"))
    head_dim = int(field("attention.key_length", n_embd // n_head))
    if int(field("attention.value_length", head_dim)) != head_dim:
        raise InvalidRequestError("different key and value head sizes are not supported by the trainer")
    if int(field("rope.dimension_count", head_dim)) != head_dim:
        raise InvalidRequestError("partial RoPE is not supported by the trainer")
    scaling = str(field("rope.scaling.type", "none") or "none")
    factor = float(field("rope.scaling.factor", 0.0) or 0.0)
    if scaling not in ("none", "linear") and factor not in (0.0, 1.0):
        raise InvalidRequestError(f"cannot train with RoPE scaling {scaling!r} (x{factor}); supported: linear")
    n_layer = int(field("block_count"))
    window, sliding = 0, ()
    extra = {}
    if arch in GEMMA:
        if float(field("final_logit_softcapping", 0.0) or 0.0):
            raise InvalidRequestError("final logit soft-capping is not supported by the trainer")
        window = int(field("attention.sliding_window", 0) or 0)
        pattern = field("attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # llama.cpp also accepts one flag per layer
            sliding = tuple(bool(p) for p in pattern)
        else:  # as llama.cpp's set_swa_pattern: every n-th layer global, the others sliding
            n = int(pattern)
            sliding = tuple(n == 0 or i % n < n - 1 for i in range(n_layer))
        if window and len(sliding) != n_layer:
            raise InvalidRequestError(f"sliding_window_pattern has {len(sliding)} flags for {n_layer} layers")
        # llama.cpp's Gemma 3 scale: 1/sqrt(head_dim), except the 62-layer (27B) model's 1/sqrt(n_embd/n_head)
        extra = {"rope_base_sliding": float(field("rope.freq_base_swa", 10000.0)),
                 "attn_scale": 1.0 / math.sqrt(n_embd / n_head if n_layer == 62 else head_dim)}
    return ModelShape(
        arch=arch, n_vocab=int(embd.shape[1]), n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, n_head_kv=int(field("attention.head_count_kv", n_head)),
        n_ff=int(field("feed_forward_length")), n_ctx=int(field("context_length")),
        rope_base=float(field("rope.freq_base", 10000.0)),
        rms_eps=float(field("attention.layer_norm_rms_epsilon")),
        tied_embeddings="output.weight" not in tensors, head_dim=head_dim,
        rope_scale=factor if scaling == "linear" and factor > 0 else 1.0,
        sliding_window=window, sliding_layers=sliding, **extra)


def _tensor(t) -> np.ndarray:
    arr = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(arr, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))


def tensor_names(shape: ModelShape) -> gguf.TensorNameMap:
    """gguf-py's HF <-> GGUF name table for this architecture."""
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == shape.arch)
    return gguf.get_tensor_name_map(arch, shape.n_layer)


def gguf_name(names: gguf.TensorNameMap, hf_name: str) -> str | None:
    """"model.layers.3.self_attn.q_proj.weight" -> "blk.3.attn_q.weight" (and bare module names)."""
    return names.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def gguf_reader(path: str | Path) -> gguf.GGUFReader:
    """The file's metadata and tensor index (memory-mapped; nothing is dequantized yet)."""
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise ModelLoadError(f"cannot read GGUF {path}: {e}") from e


def load_model(path: str | Path, dtype: torch.dtype = torch.float32,
               reader: gguf.GGUFReader | None = None) -> DecoderForCausalLM:
    """Dequantize the GGUF at `path` into a torch model (HF layout and names). Pass the
    file's `reader` if you have one: indexing a 262k-token vocabulary takes gguf-py seconds."""
    reader = reader or gguf_reader(path)
    c = read_config(reader)
    model = DecoderForCausalLM(c)
    names = tensor_names(c)
    ours = {gguf_name(names, k): k for k in model.state_dict()}
    ours.pop(None, None)
    if c.tied_embeddings:
        ours.pop("output.weight", None)
    sd = {}
    for t in reader.tensors:
        w = _tensor(t)
        if t.name == "rope_freqs.weight" and not c.gemma:
            if w.size != c.head_dim // 2:
                raise InvalidRequestError(f"rope_freqs.weight has {w.size} factors, expected {c.head_dim // 2}")
            model.rope_freqs.copy_(torch.from_numpy(np.array(w, dtype=np.float32).reshape(-1)))
            continue
        if t.name not in ours:
            raise InvalidRequestError(f"tensor {t.name} has no place in a {c.arch} model the trainer knows")
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if c.permuted_qk and kind in ("attn_q", "attn_k"):
            w = unpermute_qk(w, c.n_head if kind == "attn_q" else c.n_head_kv)
        sd[ours[t.name]] = w
    if c.tied_embeddings:
        sd["lm_head.weight"] = sd.get("model.embed_tokens.weight")
    missing = set(model.state_dict()) - {k for k, v in sd.items() if v is not None}
    if missing:
        raise InvalidRequestError(f"GGUF lacks tensors the trainer needs: {sorted(missing)[:5]}")
    try:
        model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in sd.items()})
    except RuntimeError as e:  # a tensor of the wrong shape for the metadata
        raise InvalidRequestError(f"GGUF tensors do not fit its own metadata: {str(e).splitlines()[-1]}") from None
    if c.tied_embeddings:  # one tensor, as in the file: a 262k x 640 vocabulary is 670 MB in float32
        model.lm_head.weight = model.model.embed_tokens.weight
    model.requires_grad_(False)
    return model.to(dtype)


def transformers_model(path: str | Path):
    """The same weights in transformers' own class for the family (the model a PEFT or
    vLLM user has): the reference our model is tested against, and the base a PEFT
    adapter we export is loaded onto. Gemma's norms go back to HF's w (GGUF holds 1 + w)."""
    import transformers

    ours = load_model(path)
    c = ours.config
    common = dict(vocab_size=c.n_vocab, hidden_size=c.n_embd, intermediate_size=c.n_ff, num_hidden_layers=c.n_layer,
                  num_attention_heads=c.n_head, num_key_value_heads=c.n_head_kv, max_position_embeddings=c.n_ctx,
                  rms_norm_eps=c.rms_eps, tie_word_embeddings=c.tied_embeddings, head_dim=c.head_dim)
    rope = {"rope_type": "default", "rope_theta": c.rope_base}
    if c.rope_scale != 1.0:
        rope = {"rope_type": "linear", "rope_theta": c.rope_base, "factor": c.rope_scale}
    if c.arch == "gemma3":
        config = transformers.Gemma3TextConfig(
            **common, query_pre_attn_scalar=round(1.0 / c.attn_scale ** 2), sliding_window=c.sliding_window or None,
            layer_types=["sliding_attention" if c.is_sliding(i) else "full_attention" for i in range(c.n_layer)],
            rope_parameters={"full_attention": rope,
                             "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_base_sliding}},
            hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None, attn_logit_softcapping=None)
    else:
        cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}[c.arch]
        config = getattr(transformers, cls)(**common, rope_parameters=rope)
    model = getattr(transformers, HF_CLASS[c.arch])(config)
    sd = ours.state_dict()
    if c.gemma:
        sd = {k: v - 1.0 if k.endswith("norm.weight") else v for k, v in sd.items()}
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"transformers' {HF_CLASS[c.arch]} does not take our weights: {result}")
    return model.requires_grad_(False).eval()
