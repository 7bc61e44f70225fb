"""The runtime and its call pipeline, used directly: no globals, no LiteLLM in between."""

import asyncio
import json
import threading

import pytest

pytest.importorskip("litellm")

from loop_helpers import RF, answer_for, messages, register_oracle  # noqa: E402
from mtllm_locally import ContextOverflowError, EngineClosedError, EngineConfig, InvalidRequestError  # noqa: E402
from mtllm_locally.serve.pipeline import Answer, CallRequest, TextDelta  # noqa: E402
from mtllm_locally.serve.runtime import Runtime  # noqa: E402

CONFIG = EngineConfig(n_ctx=512, flash_attn=False)


def request(model, inv, text="hello", **kw):
    return CallRequest(model=model, messages=[{"role": "user", "content": text}], sampling={"max_tokens": 6},
                       metadata={"jac_caller_name": "fn", "jac_invocation_id": inv}, **kw)


def test_two_runtimes_are_independent(tmp_path, tiny_model_path):
    with Runtime(store_path=tmp_path / "a.sqlite3", engine_config=CONFIG) as a, \
            Runtime(store_path=tmp_path / "b.sqlite3", engine_config=CONFIG) as b:
        heard_a, heard_b = [], []
        a.on_call(heard_a.append)
        b.on_call(heard_b.append)
        a.settings.typed_temperature = None
        ans_a = a.calls.complete(request(tiny_model_path, "inv-a"))
        ans_b = b.calls.complete(request(tiny_model_path, "inv-b"))
        assert ans_a.choices[0].text == ans_b.choices[0].text  # same model, greedy
        assert [c["invocation_id"] for c in a.store().calls()] == ["inv-a"]
        assert [c["invocation_id"] for c in b.store().calls()] == ["inv-b"]
        assert [h.invocation_id for h in heard_a] == ["inv-a"] and [h.invocation_id for h in heard_b] == ["inv-b"]
        assert heard_a[0].task_key.startswith("fn:") and heard_a[0].model_path == a.engines.get(tiny_model_path).info.path
        assert a.engines.get(tiny_model_path) is not b.engines.get(tiny_model_path)
        assert b.settings.typed_temperature == 0.0  # settings belong to their runtime


def test_closing_a_runtime_releases_what_it_owns(tmp_path, tiny_model_path):
    rt = Runtime(store_path=tmp_path / "c.sqlite3", engine_config=CONFIG)
    stopped = []
    rt.on_close(lambda: stopped.append(True))
    rt.calls.complete(request(tiny_model_path, "inv-c"))
    eng = rt.engines.get(tiny_model_path)
    rt.close()
    assert eng.closed and stopped == [True] and rt.store() is None
    with pytest.raises(EngineClosedError):
        rt.calls.complete(request(tiny_model_path, "inv-d"))
    rt.close()  # idempotent


def test_last_invocation_is_per_context(tmp_path, tiny_model_path):
    with Runtime(store_path=tmp_path / "d.sqlite3", engine_config=CONFIG) as rt:
        rt.calls.complete(request(tiny_model_path, "inv-main"))
        seen = {}

        def other():
            rt.calls.complete(request(tiny_model_path, "inv-thread"))
            seen["thread"] = rt.last_invocation.get()

        t = threading.Thread(target=other)
        t.start()
        t.join(60)
        assert seen["thread"] == "inv-thread" and rt.last_invocation.get() == "inv-main"
        assert rt.feedback(correct=True) == "inv-main"
        assert rt.store().feedback("inv-main")[0]["correct"] == 1


async def test_async_entry_points_run_on_the_callers_loop(tmp_path, tiny_model_path):
    with Runtime(store_path=tmp_path / "e.sqlite3", engine_config=CONFIG) as rt:
        answers = await asyncio.gather(*[rt.calls.acomplete(request(tiny_model_path, f"inv-{i}", f"q{i}"))
                                         for i in range(4)])
        assert all(isinstance(a, Answer) and a.invocation_id == f"inv-{i}" for i, a in enumerate(answers))
        assert rt.last_invocation.get() is None  # gather ran each in its own task context
        events = [e async for e in rt.calls.astream(request(tiny_model_path, "inv-s"))]
        assert all(isinstance(e, TextDelta) for e in events[:-1]) and isinstance(events[-1], Answer)
        assert "".join(e.text for e in events[:-1]) == events[-1].choices[0].text
        assert rt.last_invocation.get() == "inv-s"


def test_errors_reach_the_caller_and_a_stream_left_early_is_cancelled(tmp_path, tiny_model_path):
    with Runtime(store_path=tmp_path / "f.sqlite3", engine_config=CONFIG) as rt:
        with pytest.raises(InvalidRequestError, match="n > 1 is not supported with stream"):
            list(rt.calls.stream(CallRequest(**{**request(tiny_model_path, "x").__dict__, "n": 2})))
        with pytest.raises(ContextOverflowError):
            rt.calls.complete(request(tiny_model_path, "inv-long", "word " * 2000))
        assert rt.store().turns("inv-long") == []  # a failed call is not captured as a turn
        events = rt.calls.stream(CallRequest(**{**request(tiny_model_path, "inv-early").__dict__,
                                                "sampling": {"max_tokens": 300}}))
        assert isinstance(next(events), TextDelta)
        eng = rt.engines.get(tiny_model_path)
        before = eng.stats()
        events.close()
        eng.generate("x", max_tokens=1)  # cancellations are finished at the start of the next step
        after = eng.stats()
        assert after["requests_finished"] == before["requests_finished"] + 2
        assert after["tokens_generated"] - before["tokens_generated"] < 300  # stopped short of its budget
        assert rt.store().turns("inv-early") == []


def test_teacher_answers_every_entry_point_alike(tmp_path, tiny_model_path):
    """Streaming too: the teacher's answer arrives as one delta, and is captured as the
    teacher's with the student's shadow answer beside it."""
    register_oracle()
    with Runtime(store_path=tmp_path / "g.sqlite3", engine_config=CONFIG) as rt:
        rt.policy.configure("classify", teacher="oracle/labeller")
        msgs = messages(3, "sky")
        req = CallRequest(model=tiny_model_path, messages=msgs, response_format=RF, sampling={"max_tokens": 20},
                          metadata={"jac_caller_name": "classify", "jac_invocation_id": "inv-t1"})
        done = rt.calls.complete(req)
        streamed = list(rt.calls.stream(CallRequest(**{**req.__dict__,
                                                       "metadata": {"jac_caller_name": "classify",
                                                                    "jac_invocation_id": "inv-t2"}})))
        assert done.choices[0].text == answer_for(msgs) == streamed[0].text
        assert isinstance(streamed[-1], Answer) and streamed[-1].source == "teacher:oracle/labeller"
        for inv in ("inv-t1", "inv-t2"):
            (turn,) = rt.store().turns(inv)
            assert turn["source"] == "teacher:oracle/labeller" and turn["output_text"] == answer_for(msgs)
            assert json.loads(turn["shadow_output"])  # the student's constrained answer, in shadow
        # another function has no teacher: the model answers
        other = rt.calls.complete(CallRequest(**{**req.__dict__, "metadata": {"jac_caller_name": "other"}}))
        assert other.source == "model" and other.teacher_response is None
