"""Training bench: a typed classification function the base model cannot know,
accuracy through the engine before and after a LoRA trained on <= 200 examples.

Task: route a support ticket to one of four teams by the product it mentions (the
product -> team mapping is invented, so the base model sits near chance). Prompts
and the JSON schema are shaped like byllm's for `def route(ticket: str) -> Team by
llm()`; the completion is the constrained JSON the engine would emit.

Ratios: train_speedup_vs_naive (our trainer's tokens/s / a naive PEFT loop's: fp32,
logits and loss over every position, on transformers' LlamaForCausalLM holding the same
weights; goal >= 3), train_speedup_vs_naive_same_model (the same naive loop on the
trainer's own torch model, whose kernels the trainer shares) and accuracy_gain
(held-out accuracy after / before, both measured here).
"""

from __future__ import annotations

import json
import random
import tempfile
import time

import torch

from .. import Engine, models
from ..learn.trainer import TrainConfig, Tokenization, prepare_examples, train

GOALS = {"train_speedup_vs_naive": ">= 3", "accuracy_gain": "> 1 (after >= 0.9)"}
PRODUCTS = {"Zorblax": 1, "Quintel": 2, "Mervo": 3, "Tapple": 4, "Vexor": 1, "Plimm": 2, "Dravik": 3, "Sunto": 4}
ISSUES = ["stopped working after the update", "is charging me twice", "arrived with a cracked screen",
          "will not connect to wifi", "needs a replacement part", "shows error 42 on startup",
          "was delivered to the wrong address", "makes a loud noise", "lost all my settings", "is too slow"]
SCHEMA = {"type": "object", "title": "schema_object_wrapper", "properties": {"schema_object_wrapper": {
    "type": "integer", "description": "Team.\nThe value *should* be one in this list: [1, 2, 3, 4]"}},
    "required": ["schema_object_wrapper"], "additionalProperties": False}
RF = {"type": "json_schema", "json_schema": {"name": "Team", "schema": SCHEMA, "strict": True}}


def messages(ticket: str) -> list[dict]:
    return [{"role": "system", "content": "This is a task you must complete by returning only the output.\n"
                                          "Do not include explanations, code, or extra text—only the result."},
            {"role": "user", "content": f"route\n\nticket = ({ticket!r}, '')\n\nSchema requirements:\n"
                                        "- schema_object_wrapper must be one of: 1=TEAM_A, 2=TEAM_B, 3=TEAM_C, 4=TEAM_D"}]


def dataset(n: int, seed: int, products: dict[str, int] = PRODUCTS) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    names = list(products)
    out = []
    for _ in range(n):
        p = rng.choice(names)
        out.append((f"My {p} {rng.choice(ISSUES)}. Order #{rng.randint(1000, 9999)}.", products[p]))
    return out


def accuracy(eng: Engine, data, adapters=()) -> float:
    reqs = [eng.submit(messages=messages(t), response_format=RF, max_tokens=16, adapters=adapters) for t, _ in data]
    ok = 0
    for r, (_, label) in zip(reqs, data):
        try:
            ok += json.loads(r.result().text)["schema_object_wrapper"] == label
        except (ValueError, KeyError):
            pass
    return ok / len(data)


def naive_tokens_per_second(path: str, examples, steps: int, batch_size: int, model: str = "transformers") -> float:
    """The baseline: PEFT on a Llama in fp32, examples in order (no length buckets), full
    logits and loss over every position. `model` is transformers' LlamaForCausalLM (what
    a PEFT user writes) or "ours" (the trainer's torch model: same kernels, so the ratio
    shows what the trainer's method alone gains)."""
    from peft import LoraConfig, get_peft_model

    from ..learn.torch_model import load_model, transformers_model

    base = transformers_model(path) if model == "transformers" else load_model(path)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=list(
        TrainConfig().target_modules), lora_dropout=0.0))
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    tokens, t0 = 0, time.perf_counter()
    for s in range(-1, steps):  # step -1 warms up (first-call allocations) and is not timed
        if s == 0:
            tokens, t0 = 0, time.perf_counter()
        batch = examples[(s % steps * batch_size) % len(examples):][:batch_size]
        seqs = [e.prompt_ids + e.completion_ids for e in batch]
        T = max(len(x) for x in seqs)
        ids = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, x in enumerate(seqs):
            ids[b, : len(x)] = torch.tensor(x)
        logits = peft_model(input_ids=ids).logits if model == "transformers" else peft_model.base_model.model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        tokens += sum(len(x) for x in seqs)
    return tokens / (time.perf_counter() - t0)


def run(quick: bool = False, log=print) -> dict:
    served = str(models.resolve(None))
    data = dataset(360, seed=0)
    train_set, held_out = data[:200], data[200:]
    examples = [{"messages": messages(t), "completion": json.dumps({"schema_object_wrapper": y}, separators=(",", ":"))}
                for t, y in train_set]
    log(f"[1/4] held-out accuracy of the base model ({len(held_out)} tickets, constrained decoding)")
    with Engine(None, n_ctx=2048) as eng:
        before = accuracy(eng, held_out)
    log(f"      {before:.3f} (chance is 0.25)")

    cfg = TrainConfig()
    log(f"[2/4] training a LoRA on {len(train_set)} examples: {cfg}")
    out = tempfile.mkdtemp(prefix="mtllm-train-bench-")
    t0 = time.perf_counter()
    res = train(None, examples, cfg, out, progress=not quick)
    wall = time.perf_counter() - t0
    size_kb = res.gguf_path.stat().st_size / 1024
    log(f"      {wall:.1f} s wall, {res.steps} steps, {res.tokens_per_second:.0f} tok/s, loss "
        f"{res.losses[0]:.3f} -> {res.losses[-1]:.3f}, GGUF adapter {size_kb:.0f} KiB")

    log("[3/4] naive PEFT loops on the same data (fp32, full logits and loss), tokens/s")
    tok = Tokenization(served)
    prepared = prepare_examples(tok, examples, cfg.max_length)
    steps = 4 if quick else 8
    naive = naive_tokens_per_second(served, prepared, steps=steps, batch_size=cfg.batch_size)
    log(f"      transformers' LlamaForCausalLM + PEFT: {naive:.0f} tok/s")
    naive_ours = naive_tokens_per_second(served, prepared, steps=steps, batch_size=cfg.batch_size, model="ours")
    log(f"      the trainer's own torch model + PEFT:  {naive_ours:.0f} tok/s")

    log("[4/4] held-out accuracy through the engine with the adapter")
    with Engine(None, n_ctx=2048) as eng:
        a = eng.load_adapter(res.gguf_path)
        after = accuracy(eng, held_out, [(a, 1.0)])
    log(f"      {after:.3f}")
    plot = None
    try:
        from ..learn.plot import plot_losses

        plot = str(plot_losses(res.losses, f"{out}/train.png", title="bench train: completion loss per step"))
    except ImportError:
        pass
    return {"goals": GOALS, "before": before, "after": after, "plot": plot, "train_wall_s": wall, "steps": res.steps,
            "train_tok_s": res.tokens_per_second, "naive_tok_s": naive, "naive_same_model_tok_s": naive_ours,
            "adapter_kib": size_kb, "losses": res.losses,
            "ratios": {"train_speedup_vs_naive": res.tokens_per_second / naive,
                       "train_speedup_vs_naive_same_model": res.tokens_per_second / naive_ours,
                       "accuracy_gain": after / max(before, 1e-9)}}
