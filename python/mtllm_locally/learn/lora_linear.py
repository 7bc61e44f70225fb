"""A LoRA linear layer as one autograd function, for training speed on CPU.

    y = x Wᵀ + b + s · (x Aᵀ) Bᵀ    W (and Qwen2's q/k/v bias b) frozen, A (r x in) and B (out x r) trained

PEFT computes this as four ops with two full-size temporaries (the scaled LoRA output
and the sum); here the LoRA product is accumulated into the base GEMM's output in place
(addmm_), and the
backward pass does the same for the input gradient and skips it where the input needs
none (the first block's). q, k and v, which read the same input, run as one such
product: their base weights stacked (once; they are frozen), their A matrices stacked
and their B matrices on a block diagonal, so a layer's three projections are two
GEMMs, not nine (k and v are narrow under GQA). Same numbers to float rounding; on
SmolLM2 a training step is ~5% faster from the fused forward, ~6% more from q/k/v.

PEFT still owns the parameters, the config and the saved format: `use_fused_forward`
only replaces the forward of PEFT's LoRA Linear modules it can reproduce exactly
(one active adapter, no dropout, not merged, no DoRA); any other keeps PEFT's own.
"""

from __future__ import annotations

import torch
from torch import nn


class LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float):
        rows = x.reshape(-1, x.shape[-1])
        h = rows @ lora_a.t()                                           # (N, r)
        y = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
        y.addmm_(h, lora_b.t(), alpha=scale)                            # (N, out), accumulated in place
        ctx.save_for_backward(rows, h, weight, lora_a, lora_b)
        ctx.scale, ctx.x_shape = scale, x.shape
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        rows, h, weight, lora_a, lora_b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        u = (g @ lora_b).mul_(ctx.scale)                                # (N, r): the gradient reaching h
        grad_x = (g @ weight).addmm_(u, lora_a).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_a = u.t() @ rows if ctx.needs_input_grad[3] else None
        grad_b = (g.t() @ h).mul_(ctx.scale) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_a, grad_b, None


def _fusable(m) -> bool:
    names = list(m.lora_A.keys())
    if len(names) != 1 or getattr(m, "merged", False):
        return False
    name = names[0]
    dropout = m.lora_dropout[name] if name in m.lora_dropout else nn.Identity()
    dora = getattr(m, "use_dora", {}).get(name, False)
    return isinstance(dropout, nn.Identity) and not dora and m.lora_A[name].bias is None \
        and m.lora_B[name].bias is None and list(m.active_adapters) == [name]


def _stacked_qkv(attn) -> callable:
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    names = [m.active_adapters[0] for m in (q, k, v)]
    weight = torch.cat([m.base_layer.weight for m in (q, k, v)])
    bias = torch.cat([m.base_layer.bias for m in (q, k, v)]) if q.base_layer.bias is not None else None
    widths = [m.base_layer.weight.shape[0] for m in (q, k, v)]
    scale = float(q.scaling[names[0]])

    def project(x):
        if q.disable_adapters:
            return q.base_layer(x), k.base_layer(x), v.base_layer(x)
        a = torch.cat([m.lora_A[n].weight for m, n in zip((q, k, v), names)])
        b = torch.block_diag(*[m.lora_B[n].weight for m, n in zip((q, k, v), names)])
        return LoraLinear.apply(x, weight, bias, a, b, scale).split(widths, dim=-1)

    return project


def use_fused_forward(model: nn.Module) -> int:
    """Route the forward of `model`'s PEFT LoRA Linear modules through LoraLinear, and
    each attention's q/k/v through one stacked LoraLinear where all three are LoRA
    with one scale; returns how many modules were switched."""
    from peft.tuners.lora.layer import Linear

    for attn in model.modules():
        if hasattr(attn, "project_qkv"):
            mods = (getattr(attn, "q_proj", None), getattr(attn, "k_proj", None), getattr(attn, "v_proj", None))
            if all(isinstance(m, Linear) and _fusable(m) for m in mods) \
                    and len({float(m.scaling[m.active_adapters[0]]) for m in mods}) == 1 \
                    and len({m.base_layer.bias is None for m in mods}) == 1:
                attn.project_qkv = _stacked_qkv(attn)
    n = 0
    for m in model.modules():
        if isinstance(m, Linear) and _fusable(m):
            name = m.active_adapters[0]

            def forward(x, *args, m=m, name=name, **kwargs):
                if m.disable_adapters:  # PEFT's disable_adapter() context
                    return m.base_layer(x)
                return LoraLinear.apply(x, m.base_layer.weight, m.base_layer.bias, m.lora_A[name].weight,
                                        m.lora_B[name].weight,
                                        float(m.scaling[name]))

            m.forward = forward
            n += 1
    return n
