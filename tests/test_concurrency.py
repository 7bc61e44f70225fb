"""Many callers at once: threads and asyncio tasks share decode batches and still get
exactly the output they would get alone; a small KV cache evicts and preempts
without changing results."""

import asyncio
import threading

import pytest

from conftest import assert_all_greedy_equal
from mtllm_locally import Engine

PROMPTS = [f"Shared system text for every function. Task {i % 5}: input {i}" for i in range(40)]


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    with Engine(tiny_model_path, flash_attn=False, prefix_reuse=False, max_running=1) as eng:
        return {p: eng.generate(p, max_tokens=16, ignore_eos=True).token_ids for p in PROMPTS}


def test_dozens_of_threads(tiny_engine, reference):
    results, errors = {}, []

    def worker(p):
        try:
            results[p] = tiny_engine.generate(p, max_tokens=16, ignore_eos=True).token_ids
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert_all_greedy_equal(tiny_engine, PROMPTS, [results[p] for p in PROMPTS], [reference[p] for p in PROMPTS])


async def test_dozens_of_asyncio_tasks(tiny_engine, reference):
    outs = await asyncio.gather(*[tiny_engine.agenerate(p, max_tokens=16, ignore_eos=True) for p in PROMPTS])
    assert_all_greedy_equal(tiny_engine, PROMPTS, [o.token_ids for o in outs], [reference[p] for p in PROMPTS])


async def test_async_streaming_matches(tiny_engine, reference):
    async def collect(p):
        toks = []
        async for chunk in tiny_engine.astream(p, max_tokens=16, ignore_eos=True):
            toks.extend(chunk.token_ids)
        return toks

    outs = await asyncio.gather(*[collect(p) for p in PROMPTS[:12]])
    assert_all_greedy_equal(tiny_engine, PROMPTS[:12], outs, [reference[p] for p in PROMPTS[:12]])


async def test_async_cancellation_frees_the_engine(tiny_engine):
    task = asyncio.create_task(tiny_engine.agenerate(PROMPTS[0], max_tokens=900, ignore_eos=True))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    c = await asyncio.wait_for(tiny_engine.agenerate(PROMPTS[1], max_tokens=4, ignore_eos=True), 30)
    assert c.completion_tokens == 4


def test_small_kv_cache_evicts_and_preempts_without_changing_output(tiny_model_path, reference):
    # 256 cells for 12 concurrent sequences of ~40 tokens: caches must be evicted
    # and running requests preempted and recomputed.
    with Engine(tiny_model_path, flash_attn=False, n_ctx=256, max_running=12, cache_sequences=4) as eng:
        reqs = [eng.submit(p, max_tokens=16, ignore_eos=True) for p in PROMPTS[:24]]
        outs = [r.result(timeout=120).token_ids for r in reqs]
        stats = eng.stats()
        assert_all_greedy_equal(eng, PROMPTS[:24], outs, [reference[p] for p in PROMPTS[:24]])
    assert stats["evictions"] + stats["preemptions"] > 0


def test_mixed_threads_and_asyncio(tiny_engine, reference):
    results = {}

    def thread_worker(p):
        results[p] = tiny_engine.generate(p, max_tokens=16, ignore_eos=True).token_ids

    async def async_part():
        outs = await asyncio.gather(*[tiny_engine.agenerate(p, max_tokens=16, ignore_eos=True) for p in PROMPTS[20:]])
        for p, o in zip(PROMPTS[20:], outs):
            results[p] = o.token_ids

    threads = [threading.Thread(target=thread_worker, args=(p,)) for p in PROMPTS[:20]]
    for t in threads:
        t.start()
    asyncio.run(async_part())
    for t in threads:
        t.join(timeout=120)
    assert_all_greedy_equal(tiny_engine, PROMPTS, [results[p] for p in PROMPTS], [reference[p] for p in PROMPTS])
