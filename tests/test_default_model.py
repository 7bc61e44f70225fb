"""Integration on the real embedded model (SmolLM2-135M), as served by default."""

import asyncio

from conftest import assert_each_token_is_near_argmax, assert_greedy_equal
from mtllm_locally import Engine, models


def test_default_model_is_the_embedded_smollm2(default_engine):
    info = default_engine.info
    assert info.architecture == "llama"
    assert info.n_vocab == 49152
    assert "SmolLM2-135M-Instruct" in info.path
    assert info.path.endswith("Q8_0.gguf")  # served as a near-lossless, faster Q8_0 conversion


def test_answers_a_simple_question(default_engine):
    c = default_engine.generate(
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}], max_tokens=30)
    assert "Paris" in c.text
    assert c.finish_reason == "stop"
    c = default_engine.generate(messages=[{"role": "user", "content": "How many legs does a dog have?"}], max_tokens=30)
    assert "four" in c.text or "4" in c.text


def test_batched_equals_serial_on_real_model(default_engine):
    prompts = [[{"role": "user", "content": f"Name a fruit that starts with the letter {ch}."}] for ch in "ABCDEFGH"]
    serial = [default_engine.generate(messages=m, max_tokens=24).token_ids for m in prompts]
    reqs = [default_engine.submit(messages=m, max_tokens=24) for m in prompts]
    batched = [r.result().token_ids for r in reqs]
    ids = [default_engine.encode_chat(m) for m in prompts]
    # On a quantized model llama.cpp's attention rounds differently when other
    # sequences' cells sit between a sequence's own (ggml-org/llama.cpp#6583, #7052),
    # and 8-bit activation quantization amplifies that into logit changes of up to a
    # few tenths, so a batched greedy run may pick the other of two near-equal tokens
    # (an f32 model shows no such drift: see test_generation). Every token batching
    # produced must still be the argmax, up to that noise, of its own context.
    for ids_, toks in zip(ids, batched):
        assert_each_token_is_near_argmax(default_engine, ids_, toks, tol=0.5)
    # And each batched output equals the serial one, or first departs from it where the
    # serial run itself stood at a near-tie (its top two logits within that same noise).
    # Measured (12 rounds of 8 prompts): up to 4 of 8 differ, always at a top-2 gap of
    # at most 0.21; even flash_attn=False with kv_f32=True left up to 2 of 8 (gaps
    # <= 0.12 where measured), so no setting makes this model exact. A batching
    # bug (another sequence's KV cells, a wrong position) departs where the model is
    # sure: over 80% of these outputs' tokens lead their runner-up by more than 0.5.
    for ids_, b, s in zip(ids, batched, serial):
        assert_greedy_equal(default_engine, ids_, b, s, tol=0.5)


def test_shared_system_prompt_is_reused(default_engine):
    system = {"role": "system", "content": "You classify the sentiment of a sentence as positive or negative. " * 8}
    messages = [[system, {"role": "user", "content": s}] for s in ("I love it.", "I hate it.", "Great day!")]
    ids = [default_engine.encode_chat(m) for m in messages]
    shared = next(i for i, (a, b, c) in enumerate(zip(*ids)) if not a == b == c)  # the system prompt's tokens
    assert shared > 0.8 * len(ids[1])
    outs = [default_engine.generate(messages=m, max_tokens=8) for m in messages]
    assert outs[0].cached_tokens < shared  # nothing before it held this system prompt
    for out, ids_ in zip(outs[1:], ids[1:]):
        assert out.prompt_tokens == len(ids_)
        assert shared <= out.cached_tokens < out.prompt_tokens  # the whole system prompt, reused


def test_original_q4_1_file_also_serves():
    with Engine("default-q4_1", n_ctx=512) as eng:
        assert eng.info.path == str(models.embedded_default_path())
        c = asyncio.run(eng.agenerate(messages=[{"role": "user", "content": "Say hi."}], max_tokens=8))
        assert c.completion_tokens == 8 and c.finish_reason == "length"
        assert c.text.startswith("Hello"), c.text  # greedy: "Hello there! I'm here to help"
