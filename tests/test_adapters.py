"""LoRA adapters in the engine: numeric parity with a reference forward pass, prefix
cache isolation between adapter sets, hot swap under load, and bad adapters. Both ways
of applying adapters are tested: per batch row by the engine (mixed_adapters, the CPU
default: requests under different adapters share a decode) and per llama.cpp context."""

import threading

import numpy as np
import pytest

from conftest import assert_all_greedy_equal
from mtllm_locally import AdapterLoadError, Engine, InvalidRequestError
from tiny_llama import TinyConfig, build_tiny_llama, build_tiny_lora, reference_logits

CFG = TinyConfig()
PROMPT = "Hello world, this is a parity test of the engine and its adapters"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    weights = build_tiny_llama(d / "base.gguf", CFG)
    a = build_tiny_lora(d / "a.gguf", weights, CFG, rank=4, alpha=8.0, seed=1, strength=0.5)
    b = build_tiny_lora(d / "b.gguf", weights, CFG, rank=8, alpha=4.0, seed=2, strength=0.5)
    qk = build_tiny_lora(d / "qk.gguf", weights, CFG, rank=2, alpha=2.0, seed=3, strength=1.0,
                         targets=("attn_q", "attn_k"))
    return {"dir": d, "base": str(d / "base.gguf"), "weights": weights,
            "a": (str(d / "a.gguf"), a, 8.0 / 4), "b": (str(d / "b.gguf"), b, 4.0 / 8),
            "qk": (str(d / "qk.gguf"), qk, 2.0 / 2)}


def logits(eng, ids, adapters=()):
    req = eng.submit(ids, max_tokens=1, logits_all=True, adapters=adapters)
    req.result()
    return req.logits().astype(np.float64)


def rel_err(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def merged_lora(model, adapters):
    """One LoRA equal to a set of them: ranks concatenated, each scale folded into its B."""
    merged = {}
    for key, scale in adapters:
        _, lora, alpha_over_r = model[key]
        for name, (a, b) in lora.items():
            a0, b0 = merged.get(name, (np.zeros((0, a.shape[1]), np.float32), np.zeros((b.shape[0], 0), np.float32)))
            merged[name] = (np.concatenate([a0, a]), np.concatenate([b0, b * scale * alpha_over_r], axis=1))
    return merged


@pytest.mark.parametrize("mixed", [True, False], ids=["per_row", "per_context"])
def test_lora_logits_match_reference_forward(model, mixed):
    # flash_attn off and an f32 KV cache make llama.cpp compute in float32 throughout,
    # so the only error left is float32 rounding: measured ~2e-7 relative for the base
    # alone. The adapter path must be as exact (1e-5 leaves room for 30x that).
    W = model["weights"]
    with Engine(model["base"], flash_attn=False, kv_f32=True, mixed_adapters=mixed) as eng:
        ids = eng.tokenize(PROMPT)
        base = logits(eng, ids)
        ref_base = reference_logits(W, ids, CFG)
        assert rel_err(base, ref_base) < 1e-5
        for key in ("a", "b", "qk"):
            path, lora, alpha_over_r = model[key]
            aid = eng.load_adapter(path)
            for scale in (1.0, 0.5):
                got = logits(eng, ids, [(aid, scale)])
                ref = reference_logits(W, ids, CFG, lora, scale * alpha_over_r)
                assert np.abs(ref - ref_base).max() > 0.5  # the adapter really changes the output
                assert rel_err(got, ref) < 1e-5, (key, scale)
        st = eng.stats()
        assert (st["row_lora_steps"] > 0, st["adapter_switches"] == 0) == (mixed, mixed)


@pytest.mark.parametrize("mixed", [True, False], ids=["per_row", "per_context"])
def test_two_adapters_at_once_add_up(model, mixed):
    W = model["weights"]
    with Engine(model["base"], flash_attn=False, kv_f32=True, mixed_adapters=mixed) as eng:
        ids = eng.tokenize(PROMPT)
        ia, ib = eng.load_adapter(model["a"][0]), eng.load_adapter(model["b"][0])
        got = logits(eng, ids, [(ia, 1.0), (ib, 1.0)])
    ref = reference_logits(W, ids, CFG, merged_lora(model, [("a", 1.0), ("b", 1.0)]), 1.0)
    assert rel_err(got, ref) < 1e-5


def test_one_decode_serves_rows_under_different_adapters_exactly(model):
    # Five requests, each under another adapter set (one, another at 0.7, two at once,
    # one at scale 2, none), different prompts, submitted together: each row gets its
    # own LoRA terms, checked against the float64 reference of that request alone.
    W = model["weights"]
    sets = [[("a", 1.0)], [("b", 0.7)], [("a", 0.5), ("qk", 1.0)], [("qk", 2.0)], []]
    prompts = [f"{PROMPT} number {i}" + " and more" * i for i in range(len(sets))]
    with Engine(model["base"], flash_attn=False, kv_f32=True, prefix_reuse=False) as eng:
        ids = {k: eng.load_adapter(model[k][0]) for k in ("a", "b", "qk")}
        toks = [eng.tokenize(p) for p in prompts]
        for _ in range(5):  # the scheduler thread starts on the first submit: it may decode that one alone
            before = eng.stats()
            reqs = [eng.submit(t, max_tokens=1, logits_all=True, adapters=[(ids[k], sc) for k, sc in s])
                    for t, s in zip(toks, sets)]
            for r in reqs:
                r.result()
            after = eng.stats()
            if after["steps"] - before["steps"] <= 2:
                break
        # five prompts, one batch: at most two decodes, so one held at least three adapter sets
        assert after["steps"] - before["steps"] <= 2, "the prompts were decoded apart"
        assert after["row_lora_steps"] - before["row_lora_steps"] == after["steps"] - before["steps"]
        assert after["adapter_switches"] == 0
        for t, s, r in zip(toks, sets, reqs):
            ref = reference_logits(W, t, CFG, merged_lora(model, s), 1.0)
            assert rel_err(r.logits().astype(np.float64), ref) < 1e-5, s


@pytest.mark.parametrize("n_threads", [1, 2])
def test_per_row_terms_hold_for_chunked_prompts_and_any_thread_count(model, n_threads):
    # n_batch 16: long prompts are cut into chunks that share decodes with other requests'
    # chunks (rows of several requests and adapters in one product, each continuing KV an
    # earlier decode wrote), and the LoRA terms run on 1 or 2 threads (the serial and the
    # shared-team branch): every request still equals its reference. (Steps whose output
    # rows are fewer than their tokens are the generation tests' prompt steps.)
    W = model["weights"]
    sets = [[("a", 1.0)], [], [("b", 0.7)], [("qk", 1.0), ("b", 1.0)]]
    prompts = [" ".join([PROMPT] * (2 + i)) for i in range(len(sets))]
    with Engine(model["base"], flash_attn=False, kv_f32=True, prefix_reuse=False, n_batch=16, max_running=4,
                n_threads=n_threads) as eng:
        ids = {k: eng.load_adapter(model[k][0]) for k in ("a", "b", "qk")}
        toks = [eng.tokenize(p) for p in prompts]
        assert min(len(t) for t in toks) > 16
        reqs = [eng.submit(t, max_tokens=1, logits_all=True, adapters=[(ids[k], sc) for k, sc in s])
                for t, s in zip(toks, sets)]
        for r in reqs:
            r.result()
        assert eng.stats()["row_lora_steps"] >= 4
    for t, s, r in zip(toks, sets, reqs):
        ref = reference_logits(W, t, CFG, merged_lora(model, s), 1.0)
        assert rel_err(r.logits().astype(np.float64), ref) < 1e-5, s


def _first_divergence_is_a_tie(eng, ids, got, want, adapters, tol=2e-3):
    if got == want:
        return True
    k = next(i for i, (x, y) in enumerate(zip(got, want)) if x != y)
    r = eng.submit(ids + want[:k], max_tokens=1, logits_all=True, adapters=adapters)
    r.result()
    top2 = np.sort(r.logits()[-1])[-2:]
    return top2[1] - top2[0] < tol


def test_mixed_adapter_requests_share_decodes_and_keep_their_tokens(model):
    # 8 generating requests over 4 adapter sets: per row they advance together (about one
    # decode per token), per context each set takes its own decodes (about four per token);
    # both give the tokens each request gets alone.
    prompts = [f"Ticket {i}: route item {i * 13} to the right queue" for i in range(8)]
    out, steps = {}, {}
    for mixed in (True, False):
        with Engine(model["base"], flash_attn=False, kv_f32=True, mixed_adapters=mixed) as eng:
            aids = [eng.load_adapter(model[k][0]) for k in ("a", "b", "qk")]
            sets = [[], [(aids[0], 1.0)], [(aids[1], 0.7)], [(aids[2], 1.0)]]
            alone = [eng.generate(p, max_tokens=24, ignore_eos=True, adapters=sets[i % 4]).token_ids
                     for i, p in enumerate(prompts)]
            s0 = eng.stats()["steps"]
            reqs = [eng.submit(p, max_tokens=24, ignore_eos=True, adapters=sets[i % 4]) for i, p in enumerate(prompts)]
            out[mixed] = [r.result().token_ids for r in reqs]
            steps[mixed] = eng.stats()["steps"] - s0
            for i, p in enumerate(prompts):
                assert _first_divergence_is_a_tie(eng, eng.tokenize(p), out[mixed][i], alone[i], sets[i % 4]), (mixed, i)
    assert len({tuple(t) for t in out[True]}) == 8
    assert steps[True] < 40 and steps[False] > 80, steps  # 24 tokens each: ~25 decodes vs ~100


def test_a_float16_adapter_is_applied_per_row_in_float32(model, tmp_path):
    # Adapters converted by llama.cpp's convert_lora_to_gguf are float16 by default. Per
    # row the engine widens them to float32 once and multiplies float32 activations, so
    # the result is the reference's on the float16 values to float32 rounding.
    W, r, rng = model["weights"], 4, np.random.default_rng(11)
    lora, tensors = {}, {}
    for name, w in W.items():
        if name.startswith("blk.") and name.split(".")[2] in ("attn_v", "ffn_up", "ffn_down"):
            n_out, n_in = w.shape
            a = (rng.standard_normal((r, n_in)) / np.sqrt(n_in)).astype(np.float16)
            b = (rng.standard_normal((n_out, r)) * 0.5).astype(np.float16)
            lora[name] = (a.astype(np.float32), b.astype(np.float32))
            tensors[name + ".lora_a"], tensors[name + ".lora_b"] = a, b
    _write(tmp_path / "f16.gguf", alpha=8.0, tensors=tensors)
    with Engine(model["base"], flash_attn=False, kv_f32=True) as eng:
        ids = eng.tokenize(PROMPT)
        aid = eng.load_adapter(str(tmp_path / "f16.gguf"))
        got = logits(eng, ids, [(aid, 1.0)])
        assert eng.stats()["row_lora_steps"] >= 1
    ref = reference_logits(W, ids, CFG, lora, 8.0 / r)
    assert np.abs(ref - reference_logits(W, ids, CFG)).max() > 0.5
    assert rel_err(got, ref) < 1e-5


def test_an_adapter_of_the_output_layer_is_served_per_context(model, tmp_path):
    # The engine adds LoRA terms per row only to block matrices; an adapter with any other
    # tensor (here the output layer) is set on the context instead, mixed mode or not.
    r, E, V = 4, CFG.n_embd, model["weights"]["output.weight"].shape[0]
    rng = np.random.default_rng(7)
    _write(tmp_path / "out.gguf", alpha=4.0, tensors={
        "output.weight.lora_a": (rng.standard_normal((r, E)) / np.sqrt(E)).astype(np.float32),
        "output.weight.lora_b": rng.standard_normal((V, r)).astype(np.float32)})
    got = {}
    for mixed in (True, False):
        with Engine(model["base"], flash_attn=False, kv_f32=True, mixed_adapters=mixed) as eng:
            oid, aid = eng.load_adapter(str(tmp_path / "out.gguf")), eng.load_adapter(model["a"][0])
            ids = eng.tokenize(PROMPT)
            reqs = [eng.submit(ids, max_tokens=1, logits_all=True, adapters=s) for s in ([(oid, 1.0)], [(aid, 1.0)], [])]
            got[mixed] = [(q.result(), q.logits().astype(np.float64))[1] for q in reqs]
            st = eng.stats()
            assert st["adapter_switches"] >= 1  # the output adapter went onto the context
            if mixed:
                assert st["row_lora_steps"] >= 1  # ... while the block adapter still went per row
    assert np.abs(got[True][0] - got[True][2]).max() > 0.5  # the output adapter changes the logits
    for g, w in zip(got[True], got[False]):
        assert rel_err(g, w) < 1e-5


def test_prefix_cache_never_crosses_adapter_sets(model):
    ids_prompt = "A shared system prompt for every call. " * 6 + "Input: 42"
    with Engine(model["base"], flash_attn=False) as fresh:
        aid = fresh.load_adapter(model["a"][0])
        want_base = fresh.generate(ids_prompt, max_tokens=12, ignore_eos=True).token_ids
    with Engine(model["base"], flash_attn=False, prefix_reuse=False) as fresh:
        aid = fresh.load_adapter(model["a"][0])
        want_a = fresh.generate(ids_prompt, max_tokens=12, ignore_eos=True, adapters=[(aid, 1.0)]).token_ids
        want_a_half = fresh.generate(ids_prompt, max_tokens=12, ignore_eos=True, adapters=[(aid, 0.5)]).token_ids
    assert want_a != want_base
    with Engine(model["base"], flash_attn=False) as eng:
        aid = eng.load_adapter(model["a"][0])
        base1 = eng.generate(ids_prompt, max_tokens=12, ignore_eos=True)
        a1 = eng.generate(ids_prompt, max_tokens=12, ignore_eos=True, adapters=[(aid, 1.0)])
        assert a1.cached_tokens == 0  # the base's KV of the same prompt is not reused
        assert a1.token_ids == want_a
        half = eng.generate(ids_prompt, max_tokens=12, ignore_eos=True, adapters=[(aid, 0.5)])
        assert half.cached_tokens == 0  # another scale is another key
        assert half.token_ids == want_a_half
        a2 = eng.generate(ids_prompt, max_tokens=12, ignore_eos=True, adapters=[(aid, 1.0)])
        assert a2.cached_tokens > 0 and a2.token_ids == want_a
        base2 = eng.generate(ids_prompt, max_tokens=12, ignore_eos=True)
        assert base2.cached_tokens > 0 and base2.token_ids == base1.token_ids == want_base


def test_reloaded_adapter_gets_a_new_id_and_never_serves_stale_kv(model):
    prompt = "Stale KV check. " * 5
    with Engine(model["base"], flash_attn=False) as eng:
        first = eng.load_adapter(model["a"][0])
        eng.generate(prompt, max_tokens=4, adapters=[(first, 1.0)])
        eng.unload_adapter(first)
        second = eng.load_adapter(model["b"][0])  # a new version under the "same" slot
        assert second != first
        with pytest.raises(InvalidRequestError, match="not loaded"):
            eng.generate(prompt, max_tokens=4, adapters=[(first, 1.0)])
        c = eng.generate(prompt, max_tokens=4, adapters=[(second, 1.0)])
        assert c.cached_tokens == 0


def test_mixed_adapters_in_flight_match_serial(model):
    prompts = [f"Request {i}: classify item {i * 17}" for i in range(12)]
    with Engine(model["base"], flash_attn=False) as eng:
        ia, ib = eng.load_adapter(model["a"][0]), eng.load_adapter(model["b"][0])
        sets = [(), [(ia, 1.0)], [(ib, 0.7)]]
        serial = [eng.generate(p, max_tokens=10, ignore_eos=True, adapters=sets[i % 3]).token_ids
                  for i, p in enumerate(prompts)]
        reqs = [eng.submit(p, max_tokens=10, ignore_eos=True, adapters=sets[i % 3]) for i, p in enumerate(prompts)]
        together = [r.result().token_ids for r in reqs]
        ids = [eng.tokenize(p) for p in prompts]
        for s in range(3):  # compare within each adapter group (ties checked under that group)
            idx = [i for i in range(12) if i % 3 == s]
            for i in idx:
                if together[i] != serial[i]:
                    r = eng.submit(ids[i] + serial[i][:next(k for k, (x, y) in enumerate(zip(together[i], serial[i])) if x != y)],
                                   max_tokens=1, logits_all=True, adapters=sets[s])
                    r.result()
                    top2 = np.sort(r.logits()[-1])[-2:]
                    assert top2[1] - top2[0] < 2e-3
    assert len({tuple(t) for t in serial}) == 12


def test_hot_swap_under_load(model):
    prompts = [f"Streaming request {i} " * 3 for i in range(6)]
    with Engine(model["base"], flash_attn=False, prefix_reuse=False) as ref_eng:
        aid = ref_eng.load_adapter(model["a"][0])
        want_base = [ref_eng.generate(p, max_tokens=60, ignore_eos=True).token_ids for p in prompts]
        want_a = ref_eng.generate("New adapter request", max_tokens=20, ignore_eos=True, adapters=[(aid, 1.0)]).token_ids
    with Engine(model["base"], flash_attn=False) as eng:
        streams = [[] for _ in prompts]
        started = threading.Barrier(len(prompts) + 1)

        def consume(i):
            gen = eng.stream(prompts[i], max_tokens=60, ignore_eos=True)
            first = next(gen)
            streams[i].append(("before", first.token_ids))
            started.wait()
            for chunk in gen:
                streams[i].append(("after", chunk.token_ids))

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        started.wait()  # every stream is mid-generation
        aid = eng.load_adapter(model["a"][0])
        got_a = eng.generate("New adapter request", max_tokens=20, ignore_eos=True, adapters=[(aid, 1.0)]).token_ids
        for t in threads:
            t.join(timeout=120)
        got_base = [[tok for _, toks in s for tok in toks] for s in streams]
        assert all(any(k == "after" for k, _ in s) for s in streams)  # they kept streaming
        assert_all_greedy_equal(eng, prompts, got_base, want_base)
        assert got_a == want_a


def test_unload_while_in_use_finishes_the_request(model):
    with Engine(model["base"]) as eng:
        aid = eng.load_adapter(model["a"][0])
        req = eng.submit("long one", max_tokens=200, ignore_eos=True, adapters=[(aid, 1.0)])
        eng.unload_adapter(aid)
        assert aid not in [i for i, _ in eng.adapters()]
        with pytest.raises(InvalidRequestError):
            eng.submit("new", adapters=[(aid, 1.0)])
        assert req.result(timeout=60).completion_tokens == 200
        with pytest.raises(InvalidRequestError):
            eng.unload_adapter(aid)


def _write(path, arch="llama", general_type="adapter", tensors=None, alpha=1.0):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.type", general_type)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    for name, arr in (tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_bad_adapters_raise_clear_errors(model, tmp_path):
    r, E = 4, CFG.n_embd
    good_a = np.zeros((r, E), np.float32)
    cases = {
        "missing": (tmp_path / "missing.gguf", "not found"),
        "garbage": (tmp_path / "garbage.gguf", "not a GGUF"),
        "other_arch": (tmp_path / "qwen.gguf", "made for architecture 'qwen2'"),
        "wrong_shape": (tmp_path / "shape.gguf", "cannot load LoRA"),
        "unknown_tensor": (tmp_path / "unknown.gguf", "cannot load LoRA"),
        "a_model_not_an_adapter": (model["base"], "not a LoRA adapter"),
    }
    (tmp_path / "garbage.gguf").write_bytes(b"\x00" * 1000)
    _write(tmp_path / "qwen.gguf", arch="qwen2",
           tensors={"blk.0.attn_q.weight.lora_a": good_a, "blk.0.attn_q.weight.lora_b": np.zeros((E, r), np.float32)})
    _write(tmp_path / "shape.gguf",  # an adapter for a model twice as wide
           tensors={"blk.0.attn_q.weight.lora_a": np.zeros((r, 2 * E), np.float32),
                    "blk.0.attn_q.weight.lora_b": np.zeros((2 * E, r), np.float32)})
    _write(tmp_path / "unknown.gguf",
           tensors={"blk.7.attn_q.weight.lora_a": good_a, "blk.7.attn_q.weight.lora_b": np.zeros((E, r), np.float32)})
    with Engine(model["base"]) as eng:
        for name, (path, msg) in cases.items():
            with pytest.raises(AdapterLoadError, match=msg):
                eng.load_adapter(path)
        assert eng.adapters() == []
        assert eng.generate("still fine", max_tokens=3, ignore_eos=True).completion_tokens == 3
