"""Generation on a tiny random model: exactness across batching, prefix reuse and
streaming, plus sampling parameters, stop strings, limits and every error path."""

import threading

import numpy as np
import pytest

from conftest import assert_all_greedy_equal, assert_greedy_equal
from mtllm_locally import (ContextOverflowError, Engine, EngineClosedError, InvalidRequestError,
                           OverloadedError, SamplingParams)

PROMPTS = [f"Question {i}: what is {i} plus {i * 3}? " + "Explain. " * (i % 4) for i in range(12)]


def greedy(engine, prompt, n=24, **kw):
    return engine.generate(prompt, max_tokens=n, ignore_eos=True, **kw)


def test_greedy_is_deterministic(tiny_engine):
    a = greedy(tiny_engine, PROMPTS[0])
    b = greedy(tiny_engine, PROMPTS[0])
    assert a.token_ids == b.token_ids and len(a.token_ids) == 24
    assert a.finish_reason == "length"
    assert a.prompt_tokens == len(tiny_engine.tokenize(PROMPTS[0]))


def test_batched_equals_one_at_a_time(tiny_model_path):
    with Engine(tiny_model_path, flash_attn=False, prefix_reuse=False) as eng:
        serial = [greedy(eng, p).token_ids for p in PROMPTS]
        reqs = [eng.submit(p, max_tokens=24, ignore_eos=True) for p in PROMPTS]
        batched = [r.result().token_ids for r in reqs]
        assert eng.stats()["steps"] < 2 * 24 * len(PROMPTS)  # they really shared steps
        assert_all_greedy_equal(eng, PROMPTS, batched, serial)


def test_prefix_reuse_changes_nothing_but_cost(tiny_model_path):
    system = "You are a careful classifier. " * 20
    prompts = [system + f"Input {i}: item number {i}" for i in range(6)]
    with Engine(tiny_model_path, flash_attn=False, prefix_reuse=False) as cold:
        expected = [greedy(cold, p).token_ids for p in prompts]
    with Engine(tiny_model_path, flash_attn=False, prefix_reuse=True) as warm:
        got = [greedy(warm, p) for p in prompts]
        concurrent = [r.result() for r in [warm.submit(p, max_tokens=24, ignore_eos=True) for p in prompts]]
        assert_all_greedy_equal(warm, prompts, [c.token_ids for c in got], expected)
        assert_all_greedy_equal(warm, prompts, [c.token_ids for c in concurrent], expected)
    assert got[0].cached_tokens == 0
    n_system = len(warm.tokenize(system))
    assert all(c.cached_tokens >= n_system - 1 for c in got[1:])
    assert all(c.cached_tokens >= n_system - 1 for c in concurrent)


def test_prefix_reuse_of_an_entire_prompt_still_generates(tiny_engine):
    first = greedy(tiny_engine, PROMPTS[3])
    again = greedy(tiny_engine, PROMPTS[3])
    assert again.cached_tokens == again.prompt_tokens - 1  # all but the last token
    assert_greedy_equal(tiny_engine, PROMPTS[3], again.token_ids, first.token_ids)


def test_streaming_equals_non_streaming(tiny_engine):
    full = greedy(tiny_engine, PROMPTS[1], n=40)
    chunks = list(tiny_engine.stream(PROMPTS[1], max_tokens=40, ignore_eos=True))
    assert "".join(c.text for c in chunks) == full.text
    assert [t for c in chunks for t in c.token_ids] == full.token_ids
    assert len(chunks) > 10  # really incremental


def test_messages_and_prompt_agree(tiny_engine):
    msgs = [{"role": "user", "content": "Hi there"}]
    a = tiny_engine.generate(messages=msgs, max_tokens=10, ignore_eos=True)
    b = tiny_engine.generate(tiny_engine.encode_chat(msgs), max_tokens=10, ignore_eos=True)
    assert a.token_ids == b.token_ids


def test_stop_string_truncates_and_never_streams(tiny_engine):
    ref = greedy(tiny_engine, PROMPTS[2], n=40).text
    assert len(ref) > 20
    stop = ref[10:14]
    cut = ref.index(stop)
    got = tiny_engine.generate(PROMPTS[2], max_tokens=40, ignore_eos=True, stop=[stop, "never-occurs-xyz"])
    assert got.finish_reason == "stop"
    assert got.text == ref[:cut]
    streamed = "".join(c.text for c in tiny_engine.stream(PROMPTS[2], max_tokens=40, ignore_eos=True, stop=stop))
    assert streamed == ref[:cut]


def test_eos_stops_generation(tiny_engine):
    # The random model emits an end-of-generation token sooner or later for some prompt.
    finished = [tiny_engine.generate(p, max_tokens=200) for p in PROMPTS]
    for c in finished:
        assert c.finish_reason in ("stop", "length")
        assert c.completion_tokens <= 200
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in (0, 2)  # <|endoftext|> or <|im_end|> ends it


def test_max_tokens_zero_generates_nothing(tiny_engine):
    c = tiny_engine.generate(PROMPTS[0], max_tokens=0)
    assert c.text == "" and c.completion_tokens == 0 and c.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_varies(tiny_engine):
    kw = dict(max_tokens=20, temperature=1.0, ignore_eos=True)
    a = tiny_engine.generate(PROMPTS[0], seed=7, **kw).token_ids
    b = tiny_engine.generate(PROMPTS[0], seed=7, **kw).token_ids
    c = tiny_engine.generate(PROMPTS[0], seed=8, **kw).token_ids
    assert a == b
    assert a != c


def test_top_k_one_is_greedy(tiny_engine):
    g = greedy(tiny_engine, PROMPTS[4]).token_ids
    k1 = tiny_engine.generate(PROMPTS[4], max_tokens=24, ignore_eos=True, temperature=0.9, top_k=1, seed=3).token_ids
    assert g == k1


def test_repeat_penalty_changes_output(tiny_engine):
    plain = greedy(tiny_engine, PROMPTS[5], n=40).token_ids
    penalised = tiny_engine.generate(PROMPTS[5], max_tokens=40, ignore_eos=True, repeat_penalty=1.8).token_ids
    assert len(set(penalised)) >= len(set(plain))
    assert penalised != plain or len(set(plain)) == len(plain)


def test_logits_all_returns_prompt_logits(tiny_engine):
    ids = tiny_engine.tokenize(PROMPTS[0])
    req = tiny_engine.submit(ids, max_tokens=1, logits_all=True)
    c = req.result()
    logits = req.logits()
    assert logits.shape == (len(ids), tiny_engine.info.n_vocab)
    assert np.all(np.isfinite(logits))
    assert int(np.argmax(logits[-1])) == c.token_ids[0]  # the sampled token is the last row's argmax


def test_cancel_in_flight(tiny_engine):
    req = tiny_engine.submit(PROMPTS[0], max_tokens=100000 // 100, ignore_eos=True)
    it = iter(req)
    next(it)
    req.cancel()
    rest = list(it)
    c = req.result()
    assert c.finish_reason == "cancelled"
    assert c.completion_tokens < 1000


def test_stream_closed_early_cancels(tiny_engine):
    gen = tiny_engine.stream(PROMPTS[0], max_tokens=900, ignore_eos=True)
    next(gen)
    gen.close()
    # The engine is free again: a new request completes promptly.
    assert greedy(tiny_engine, PROMPTS[1], n=4).completion_tokens == 4


def test_generation_stops_at_context_end(tiny_model_path):
    with Engine(tiny_model_path, flash_attn=False, n_ctx=64) as eng:
        ids = eng.tokenize(PROMPTS[0])
        c = eng.generate(ids, max_tokens=1000, ignore_eos=True)
        assert c.finish_reason == "length"
        assert eng.n_ctx >= 64  # llama.cpp may round the context up
        assert len(ids) + c.completion_tokens == eng.n_ctx


@pytest.mark.parametrize("kw", [dict(max_tokens=-1), dict(temperature=-0.1), dict(top_p=0), dict(top_p=1.5),
                                dict(top_k=-1), dict(min_p=2), dict(repeat_penalty=0), dict(seed=-1),
                                dict(temperature=float("nan")), dict(max_tokens=1.5), dict(stop=[1, 2])])
def test_bad_sampling_params(tiny_engine, kw):
    with pytest.raises(InvalidRequestError):
        tiny_engine.generate(PROMPTS[0], **kw)


def test_bad_prompts(tiny_engine):
    with pytest.raises(InvalidRequestError, match="empty"):
        tiny_engine.generate([])
    with pytest.raises(InvalidRequestError, match="out of range"):
        tiny_engine.generate([5, 10**7])
    with pytest.raises(InvalidRequestError, match="exactly one"):
        tiny_engine.generate()
    with pytest.raises(InvalidRequestError):
        tiny_engine.generate(3.14)


def test_prompt_longer_than_context(tiny_model_path):
    with Engine(tiny_model_path, flash_attn=False, n_ctx=32) as eng:
        with pytest.raises(ContextOverflowError, match=f"context holds {eng.n_ctx}"):
            eng.generate("word " * (eng.n_ctx + 10))
        # the engine still works afterwards
        assert eng.generate("hi", max_tokens=3, ignore_eos=True).completion_tokens == 3


def test_overload_is_an_error_not_a_hang(tiny_model_path):
    with Engine(tiny_model_path, flash_attn=False, max_running=1, max_queued=2) as eng:
        reqs, refused = [], 0
        for i in range(20):
            try:
                reqs.append(eng.submit(PROMPTS[i % 12], max_tokens=50, ignore_eos=True))
            except OverloadedError as e:
                assert "max_queued=2" in str(e)
                refused += 1
        assert refused > 0
        assert all(r.result(timeout=60).completion_tokens == 50 for r in reqs)


def test_closed_engine(tiny_model_path):
    eng = Engine(tiny_model_path, flash_attn=False)
    pending = eng.submit(PROMPTS[0], max_tokens=5000 // 10, ignore_eos=True)
    eng.close()
    with pytest.raises(EngineClosedError):
        eng.generate("hi")
    # a request in flight when the engine closed ends with an error, not a hang
    try:
        c = pending.result(timeout=30)
        assert c.finish_reason in ("length", "stop")
    except EngineClosedError:
        pass
    eng.close()  # idempotent


def test_result_timeout(tiny_engine):
    req = tiny_engine.submit(PROMPTS[0], max_tokens=1000, ignore_eos=True)
    with pytest.raises(TimeoutError):
        req.result(timeout=0.001)
    req.cancel()
    assert req.result(timeout=30).finish_reason in ("cancelled", "length")
