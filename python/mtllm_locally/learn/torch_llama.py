"""A Llama in torch built from exactly the GGUF file the engine serves.

We read the GGUF with the `gguf` package and dequantize its tensors ourselves rather
than going through transformers' GGUF loader: the weights are then bit-for-bit the
served ones (no re-download, no config lookup on a hub), the model is a page of code
(nanoGPT-style), and its module names follow Hugging Face's LlamaForCausalLM
(`model.layers.N.self_attn.q_proj`, ...) so PEFT targets and saves it exactly as it
would the HF model. GGUF stores q/k rows permuted for llama.cpp's RoPE; we undo that
here and redo it on export (export.py).

Architectures: llama (TinyLlama, SmolLM, Llama 2/3.x, Mistral-style GQA), including RoPE
frequency factors (Llama 3.1+'s `rope_freqs.weight`) and linear RoPE scaling. Other
architectures, other RoPE scalings and tensors we do not know raise: a model we would
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

SUPPORTED_ARCHS = ("llama",)


@dataclass(frozen=True)
class LlamaConfig:
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
    rope_scale: float = 1.0  # linear RoPE scaling: positions are divided by this

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


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
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.n_embd, c.n_head * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.n_embd, c.n_head_kv * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.n_embd, c.n_head_kv * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.n_embd, bias=False)

    # The trainer may set this to one function computing q, k and v together (lora_linear.py).
    project_qkv = None

    def project(self, x):
        if self.project_qkv is not None:
            return self.project_qkv(x)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def qkv(self, x, cos, sin):
        B, T, _ = x.shape
        c = self.c
        q, k, v = self.project(x)
        q = q.view(B, T, c.n_head, c.head_dim).transpose(1, 2)
        k = k.view(B, T, c.n_head_kv, c.head_dim).transpose(1, 2)
        v = v.view(B, T, c.n_head_kv, c.head_dim).transpose(1, 2)
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def attend(self, q, k, v, mask):
        B, _, T, _ = q.shape
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.c.n_head != self.c.n_head_kv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x, cos, sin, mask):
        return self.attend(*self.qkv(x, cos, sin), mask)


def _rope(x, cos, sin):
    """HF rotate-half RoPE: x*cos + rotate_half(x)*sin, with rotate_half(x) = cat(-x2, x1)
    written as roll(x) times a sin whose first half is negated (see LlamaForCausalLM._rope)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.n_embd, c.n_ff, bias=False)
        self.up_proj = nn.Linear(c.n_embd, c.n_ff, bias=False)
        self.down_proj = nn.Linear(c.n_ff, c.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.n_embd, c.rms_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.n_embd, c.rms_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_shared_prefix(self, x, P, B, S, rope_p, rope_s, mask_p, mask_s, keep=None):
        """x holds the rows of one prefix (P tokens, computed once) followed by the B
        continuations of it (S tokens each), flat: (P + B*S, E). Every projection runs once
        on all rows; only attention sees them apart, each continuation attending to the
        shared prefix's keys and values and to its own. `keep` (row indices): return only
        those rows, skipping the output projection and MLP of the others (the last block
        needs every row's keys and values, but only the loss rows' outputs)."""
        a, c = self.self_attn, self.self_attn.c
        h = self.input_layernorm(x)
        q, k, v = a.project(h)

        def heads(t, n, rows, b, T):
            return t[rows].view(b, T, n, c.head_dim).transpose(1, 2)

        pre, suf = slice(0, P), slice(P, None)
        qp, kp, vp = (_rope(heads(q, c.n_head, pre, 1, P), *rope_p), _rope(heads(k, c.n_head_kv, pre, 1, P), *rope_p),
                      heads(v, c.n_head_kv, pre, 1, P))
        qs, ks, vs = (_rope(heads(q, c.n_head, suf, B, S), *rope_s), _rope(heads(k, c.n_head_kv, suf, B, S), *rope_s),
                      heads(v, c.n_head_kv, suf, B, S))
        ks = torch.cat([kp.expand(B, -1, -1, -1), ks], dim=2)
        vs = torch.cat([vp.expand(B, -1, -1, -1), vs], dim=2)
        gqa = c.n_head != c.n_head_kv
        yp = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask_p, enable_gqa=gqa)
        ys = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask_s, enable_gqa=gqa)
        y = torch.cat([yp.transpose(1, 2).reshape(P, -1), ys.transpose(1, 2).reshape(B * S, -1)])
        if keep is not None:
            x, y = x[keep], y[keep]
        x = x + a.o_proj(y)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.n_vocab, c.n_embd)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.n_embd, c.rms_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.config = c
        self.model = Backbone(c)
        self.lm_head = nn.Linear(c.n_embd, c.n_vocab, bias=False)
        # llama.cpp divides each RoPE frequency's angle by its factor (rope_freqs.weight, Llama 3.1+)
        self.register_buffer("rope_freqs", torch.ones(c.head_dim // 2), persistent=False)

    def hidden_states(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, E); logits are computed by the caller only where needed."""
        x = self.model.embed_tokens(ids)
        return self.model.norm(self.run_layers(x, attention_mask, 0, self.config.n_layer))

    def _rope(self, start: int, T: int, dtype, device):
        c = self.config
        pos = torch.arange(start, start + T, device=device).float() / c.rope_scale
        inv = c.rope_base ** (-torch.arange(0, c.head_dim, 2, device=device, dtype=torch.float32) / c.head_dim)
        ang = pos[:, None] * (inv / self.rope_freqs.float())[None, :]
        return (torch.cat([ang.cos(), ang.cos()], -1)[None, None].to(dtype),
                torch.cat([-ang.sin(), ang.sin()], -1)[None, None].to(dtype))

    def run_shared_prefix(self, xp: torch.Tensor, xs: torch.Tensor, suffix_mask: torch.Tensor,
                          rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
        """All blocks on a shared prefix xp (1, P, E) and right-padded continuations xs
        (B, S, E); returns the continuations' hidden states (B, S, E), or with `rows` and
        `cols` only those positions' (N, E). Same result as running each full sequence,
        with the prefix's compute done once instead of B times."""
        P, (B, S, E) = xp.shape[1], xs.shape
        rope_p = self._rope(0, P, xp.dtype, xp.device)
        rope_s = self._rope(P, S, xs.dtype, xs.device)
        mask_p = torch.ones(P, P, dtype=torch.bool, device=xp.device).tril()[None, None]
        causal = torch.ones(S, S, dtype=torch.bool, device=xs.device).tril()
        keys = torch.cat([torch.ones(B, P, dtype=torch.bool, device=xs.device), suffix_mask.bool()], 1)
        mask_s = torch.cat([torch.ones(S, P, dtype=torch.bool, device=xs.device), causal], 1)[None, None] \
            & keys[:, None, None, :]
        x = torch.cat([xp.reshape(P, E), xs.reshape(B * S, E)])
        keep = None if rows is None else P + rows * S + cols
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            x = layer.forward_shared_prefix(x, P, B, S, rope_p, rope_s, mask_p, mask_s, keep if i == last else None)
        return x if keep is not None else x[P:].view(B, S, E)

    def run_layers(self, x: torch.Tensor, attention_mask: torch.Tensor | None, start: int, end: int) -> torch.Tensor:
        """Blocks start..end-1 on hidden states x (B, T, E). With right padding a real
        token never sees a pad (causal mask), so a layer's output for an example does
        not depend on the batch it was computed in: the trainer caches frozen layers."""
        T = x.shape[1]
        cos, sin = self._rope(0, T, x.dtype, x.device)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        mask = causal[None, None] if attention_mask is None else causal[None, None] & attention_mask[:, None, None, :].bool()
        for layer in self.model.layers[start:end]:
            x = layer(x, cos, sin, mask)
        return x

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(ids)).float()


def read_config(reader: gguf.GGUFReader) -> LlamaConfig:
    def field(key, default=None):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    arch = field("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise InvalidRequestError(f"cannot train architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    names = {t.name for t in reader.tensors}
    tokens = field("tokenizer.ggml.tokens") or []
    n_embd = int(field(f"{arch}.embedding_length"))
    n_head = int(field(f"{arch}.attention.head_count"))
    rope_dim = int(field(f"{arch}.rope.dimension_count", n_embd // n_head))
    if rope_dim != n_embd // n_head:
        raise InvalidRequestError("partial RoPE is not supported by the trainer")
    scaling = str(field(f"{arch}.rope.scaling.type", "none") or "none")
    factor = float(field(f"{arch}.rope.scaling.factor", 0.0) or 0.0)
    if scaling not in ("none", "linear") and factor not in (0.0, 1.0):
        raise InvalidRequestError(f"cannot train with RoPE scaling {scaling!r} (x{factor}); supported: linear")
    return LlamaConfig(
        n_vocab=int(field(f"{arch}.vocab_size", len(tokens))), n_embd=n_embd, n_layer=int(field(f"{arch}.block_count")),
        n_head=n_head, n_head_kv=int(field(f"{arch}.attention.head_count_kv", n_head)),
        n_ff=int(field(f"{arch}.feed_forward_length")), n_ctx=int(field(f"{arch}.context_length")),
        rope_base=float(field(f"{arch}.rope.freq_base", 10000.0)),
        rms_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon")),
        tied_embeddings="output.weight" not in names,
        rope_scale=factor if scaling == "linear" and factor > 0 else 1.0)


def _tensor(t) -> np.ndarray:
    arr = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(arr, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))


GGUF_TO_HF = MappingProxyType({
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
})
HF_TO_GGUF = MappingProxyType({v: k for k, v in GGUF_TO_HF.items()})


def gguf_reader(path: str | Path) -> gguf.GGUFReader:
    """The file's metadata and tensor index (memory-mapped; nothing is dequantized yet)."""
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise ModelLoadError(f"cannot read GGUF {path}: {e}") from e


def load_llama(path: str | Path, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Dequantize the GGUF at `path` into a torch model (HF layout and names)."""
    reader = gguf_reader(path)
    c = read_config(reader)
    model = LlamaForCausalLM(c)
    sd = {}
    for t in reader.tensors:
        w = _tensor(t)
        if t.name == "rope_freqs.weight":
            if w.size != c.head_dim // 2:
                raise InvalidRequestError(f"rope_freqs.weight has {w.size} factors, expected {c.head_dim // 2}")
            model.rope_freqs.copy_(torch.from_numpy(np.array(w, dtype=np.float32).reshape(-1)))
        elif t.name == "token_embd.weight":
            sd["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            sd["model.norm.weight"] = w
        elif t.name == "output.weight":
            sd["lm_head.weight"] = w
        elif t.name.startswith("blk."):
            _, i, kind, _ = t.name.split(".", 3)
            if kind == "attn_q":
                w = unpermute_qk(w, c.n_head)
            elif kind == "attn_k":
                w = unpermute_qk(w, c.n_head_kv)
            if kind not in GGUF_TO_HF:
                raise InvalidRequestError(f"tensor {t.name} has no place in a Llama model")
            sd[f"model.layers.{i}.{GGUF_TO_HF[kind]}.weight"] = w
        else:
            raise InvalidRequestError(f"tensor {t.name} has no place in a Llama model the trainer knows")
    if c.tied_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing = set(model.state_dict()) - set(sd)
    if missing:
        raise InvalidRequestError(f"GGUF lacks tensors the trainer needs: {sorted(missing)[:5]}")
    model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in sd.items()})
    model.requires_grad_(False)
    return model.to(dtype)
