"""Adapters and constrained decoding bench: ours vs llama-cpp-python, same GGUF.

Ratios (goal in brackets):
  adapter_switch_vs_reload  llama-cpp-python building a new Llama(lora_path=...) / our
                            switch between two loaded adapters (llama_set_adapters_lora)   [>= 100]
  constrained_overhead      our unconstrained tok/s / our schema-constrained tok/s            [<= 1.10]
  typed_call_speedup        llama-cpp-python's time for 100 typed calls (its JSON-schema
                            grammar, serial) / ours (submitted together)                     [>= 4]
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import gguf
import numpy as np

from .. import Engine, models
from .inference import _threads, run_worker

GOALS = {"adapter_switch_vs_reload": ">= 100", "constrained_overhead": "<= 1.10", "typed_call_speedup": ">= 4"}

SENTIMENT = {"type": "object", "properties": {
    "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
    "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["sentiment", "confidence"], "additionalProperties": False}
SENTENCES = ["I loved this movie", "The food was cold and bland", "It is a table", "What a fantastic day",
             "I will never come back", "The bus arrives at noon", "Best purchase ever", "This is terrible",
             "The sky is blue", "I am so happy for you"]


def typed_messages(n: int) -> list[list[dict]]:
    return [[{"role": "system", "content": "Classify the sentiment of the user's sentence. Answer in JSON."},
             {"role": "user", "content": f"{SENTENCES[i % len(SENTENCES)]} (#{i})"}] for i in range(n)]


def write_random_lora(base: str, out: str, rank: int = 8, seed: int = 0, strength: float = 0.02) -> None:
    """A random LoRA adapter of the right shapes for `base` (attention projections)."""
    reader = gguf.GGUFReader(base)
    arch = reader.fields["general.architecture"].contents()
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(out, arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(rank))
    for t in reader.tensors:
        if t.name.split(".")[-2] in ("attn_q", "attn_k", "attn_v", "attn_output"):
            n_in, n_out = int(t.shape[0]), int(t.shape[1])
            w.add_tensor(t.name + ".lora_a", (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32))
            w.add_tensor(t.name + ".lora_b", (rng.standard_normal((n_out, rank)) * strength).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tok_s(eng: Engine, prompts: list, max_tokens: int, **kw) -> tuple[float, int]:
    t0 = time.perf_counter()
    reqs = [eng.submit(messages=p, max_tokens=max_tokens, **kw) for p in prompts]
    n = sum(r.result().completion_tokens for r in reqs)
    return n / (time.perf_counter() - t0), n


def run(quick: bool = False, log=print) -> dict:
    shipped = str(models.embedded_default_path())
    n_typed = 30 if quick else 100
    tmp = tempfile.mkdtemp(prefix="mtllm-bench-")
    loras = [os.path.join(tmp, f"lora{i}.gguf") for i in range(4)]
    for i, p in enumerate(loras):
        write_random_lora(shipped, p, seed=i)
    result: dict = {"model": shipped, "threads": _threads(), "goals": GOALS}

    log("[1/4] llama-cpp-python (own process): adapter reload, 100 typed calls with its JSON-schema grammar")
    theirs = run_worker({"model": shipped, "n_ctx": 2048, "n_threads": _threads(),
                         "reload_adapters": [loras[0], loras[1], loras[0], loras[1]],
                         "typed_calls": typed_messages(n_typed), "schema": SENTIMENT})
    reload_ms = 1000 * float(np.median(theirs["reload_s"]))
    their_typed_s = theirs["typed_s"]
    their_valid = sum(_valid(t) for t in theirs["typed_texts"])
    log(f"      new Llama(lora_path=...) {reload_ms:.0f} ms; {n_typed} typed calls {their_typed_s:.1f} s "
        f"({1000 * their_typed_s / n_typed:.0f} ms/call, {their_valid} valid); "
        f"GBNF grammar {theirs['grammar_ms_per_token']:.2f} ms/token")

    log("[2/4] ours: load 4 adapters, switch between them, mixed-adapter throughput")
    with Engine(shipped, n_ctx=4096) as eng:
        t0 = time.perf_counter()
        ids = [eng.load_adapter(p) for p in loras]
        load_ms = 1000 * (time.perf_counter() - t0) / len(ids)
        msgs = typed_messages(8)
        for r in range(3):  # alternate adapters request by request
            for i in ids:
                eng.generate(messages=msgs[0], max_tokens=1, adapters=[(i, 1.0)])
        st = eng.stats()
        switch_ms = st["adapter_switch_ms"] / max(1, st["adapter_switches"])
        base_tok_s, _ = _tok_s(eng, msgs, 48, ignore_eos=True)
        t0 = time.perf_counter()
        reqs = [eng.submit(messages=m, max_tokens=48, ignore_eos=True, adapters=[(ids[k % 4], 1.0)])
                for k, m in enumerate(msgs)]
        mixed_tok_s = sum(r.result().completion_tokens for r in reqs) / (time.perf_counter() - t0)
    log(f"      adapter load {load_ms:.1f} ms; switch {switch_ms * 1000:.1f} us; "
        f"8 requests: no adapter {base_tok_s:.1f} tok/s, over 4 adapters {mixed_tok_s:.1f} tok/s")

    log("[3/4] ours: constrained vs unconstrained decoding, 8 concurrent, same prompts")
    # minLength keeps every constrained answer going for all 64 tokens, as the free ones do
    story = {"type": "object", "properties": {"story": {"type": "string", "minLength": 5000}}, "required": ["story"],
             "additionalProperties": False}
    prompts = [[{"role": "user", "content": f"Write a JSON object with a long story about animal {i}."}] for i in range(8)]
    rf = {"type": "json_schema", "json_schema": {"name": "S", "schema": story, "strict": True}}
    with Engine(shipped, n_ctx=4096) as eng:
        _tok_s(eng, prompts[:2], 8, response_format=rf)
        free, constrained = [], []
        for _ in range(2):
            free.append(_tok_s(eng, prompts, 64, ignore_eos=True)[0])
            constrained.append(_tok_s(eng, prompts, 64, response_format=rf)[0])
        free_tok_s, constrained_tok_s = max(free), max(constrained)
        one_free = _tok_s(eng, prompts[:1], 64, ignore_eos=True)[0]
        one_constrained = _tok_s(eng, prompts[:1], 64, response_format=rf)[0]
    mask_ms = 1000 * (1 / one_constrained - 1 / one_free)
    log(f"      8 concurrent: {free_tok_s:.1f} tok/s free, {constrained_tok_s:.1f} constrained; "
        f"single stream: {one_free:.1f} vs {one_constrained:.1f} (llguidance ~{mask_ms:.2f} ms/token)")

    log(f"[4/4] ours: {n_typed} typed calls submitted together (same file, same schema)")
    typed_rf = {"type": "json_schema", "json_schema": {"name": "Sentiment", "schema": SENTIMENT, "strict": True}}
    with Engine(shipped, n_ctx=4096) as eng:
        eng.generate(messages=typed_messages(1)[0], response_format=typed_rf, max_tokens=48)
        t0 = time.perf_counter()
        reqs = [eng.submit(messages=m, response_format=typed_rf, max_tokens=48) for m in typed_messages(n_typed)]
        texts = [r.result().text for r in reqs]
        our_typed_s = time.perf_counter() - t0
    our_valid = sum(_valid(t) for t in texts)
    log(f"      {our_typed_s:.1f} s ({1000 * our_typed_s / n_typed:.0f} ms/call, {our_valid} valid)")

    result.update({
        "llama_cpp_python": {"reload_ms": reload_ms, "typed_s": their_typed_s, "typed_valid": their_valid,
                             "grammar_ms_per_token": theirs["grammar_ms_per_token"]},
        "ours": {"adapter_load_ms": load_ms, "adapter_switch_ms": switch_ms, "tok_s_8_no_adapter": base_tok_s,
                 "tok_s_8_over_4_adapters": mixed_tok_s, "tok_s_8_free": free_tok_s,
                 "tok_s_8_constrained": constrained_tok_s, "mask_ms_per_token": mask_ms,
                 "typed_s": our_typed_s, "typed_valid": our_valid},
        "ratios": {"adapter_switch_vs_reload": reload_ms / switch_ms,
                   "constrained_overhead": free_tok_s / constrained_tok_s,
                   "typed_call_speedup": their_typed_s / our_typed_s},
    })
    return result


def _valid(text: str) -> bool:
    try:
        v = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return False
    return isinstance(v, dict) and v.get("sentiment") in ("positive", "negative", "neutral") and \
        isinstance(v.get("confidence"), int)
