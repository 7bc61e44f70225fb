"""The runtime and its call pipeline, used directly: no globals, no LiteLLM in between."""

import asyncio
import json
import logging
import threading

import pytest

pytest.importorskip("litellm")

from loop_helpers import RF, answer_for, messages, register_oracle  # noqa: E402
from mtllm_locally import ContextOverflowError, EngineClosedError, EngineConfig, InvalidRequestError  # noqa: E402
from mtllm_locally.serve.pipeline import Answer, CallRequest, TextDelta  # noqa: E402
from mtllm_locally.serve.runtime import Runtime  # noqa: E402
from mtllm_locally.state.store import Store  # noqa: E402

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
        assert rt.shadows.wait(120)  # the students finish after their calls returned
        for inv in ("inv-t1", "inv-t2"):
            (turn,) = rt.store().turns(inv)
            assert turn["source"] == "teacher:oracle/labeller" and turn["output_text"] == answer_for(msgs)
            assert json.loads(turn["shadow_output"])  # the student's constrained answer, in shadow
        # another function has no teacher: the model answers
        other = rt.calls.complete(CallRequest(**{**req.__dict__, "metadata": {"jac_caller_name": "other"}}))
        assert other.source == "model" and other.teacher_response is None


# Teacher mode's shadow: the call returns with the teacher's answer; the student finishes
# in the background. One running slot, held by a long request of the test's own, keeps
# the student queued (unstarted) for as long as the test wants: no timing involved.
ONE_SLOT = EngineConfig(n_ctx=1024, flash_attn=False, max_running=1)


def taught_request(model, inv):
    return CallRequest(model=model, messages=messages(3, "sky"), response_format=RF, sampling={"max_tokens": 20},
                       metadata={"jac_caller_name": "classify", "jac_invocation_id": inv})


def hold_the_slot(rt, model):
    """The engine's one running slot, taken by a request that runs ~1000 tokens unless cancelled;
    and the requests the pipeline submits from now on (the shadow), as a spy sees them
    (`.cancelled`: someone called cancel())."""
    eng = rt.engines.get(model)
    blocker = eng.submit("hold", max_tokens=1000, ignore_eos=True)
    submitted, submit = [], eng.submit

    def spy(*a, **kw):
        req = submit(*a, **kw)
        req.cancelled, cancel = False, req.cancel

        def spy_cancel():
            req.cancelled = True
            cancel()

        req.cancel = spy_cancel
        submitted.append(req)
        return req

    eng.submit = spy
    return blocker, submitted


def assert_still_running(blocker):
    """The slot is still held, so nothing queued behind it (the shadow) has started."""
    with pytest.raises(TimeoutError):
        blocker.result(timeout=0)


@pytest.mark.parametrize("path", ["blocking", "async"])
def test_a_taught_call_returns_before_its_shadow_finishes(tmp_path, tiny_model_path, path):
    register_oracle()
    with Runtime(store_path=tmp_path / "h.sqlite3", engine_config=ONE_SLOT) as rt:
        rt.policy.configure("classify", teacher="oracle/labeller")
        blocker, submitted = hold_the_slot(rt, tiny_model_path)
        req = taught_request(tiny_model_path, "inv-h")
        answer = rt.calls.complete(req) if path == "blocking" else asyncio.run(rt.calls.acomplete(req))
        (turn,) = rt.store().turns("inv-h")
        assert answer.source == "teacher:oracle/labeller" and turn["output_text"] == answer_for(req.messages)
        assert turn["shadow_output"] is None and rt.shadows.pending == 1 and len(submitted) == 1
        assert_still_running(blocker)  # so the call returned before its shadow even started
        blocker.cancel()
        assert rt.shadows.wait(120) and rt.shadows.pending == 0
        (turn,) = rt.store().turns("inv-h")
        assert json.loads(turn["shadow_output"])  # the student's constrained answer, stored into the turn
        assert submitted[0].result().text == turn["shadow_output"]
        assert turn["output_text"] == answer_for(req.messages) and turn["source"] == "teacher:oracle/labeller"


def test_closing_with_a_shadow_pending_cancels_it_and_drops_its_answer(tmp_path, tiny_model_path):
    register_oracle()
    path = tmp_path / "i.sqlite3"
    rt = Runtime(store_path=path, engine_config=ONE_SLOT)
    rt.policy.configure("classify", teacher="oracle/labeller")
    blocker, submitted = hold_the_slot(rt, tiny_model_path)
    rt.calls.complete(taught_request(tiny_model_path, "inv-i"))
    assert rt.shadows.pending == 1
    assert_still_running(blocker)
    rt.close()  # does not wait for the ~1000 tokens in front of the shadow
    assert rt.shadows.pending == 0 and not rt.shadows._thread.is_alive()
    assert submitted[0].cancelled
    try:  # it never ran: cancelled, or failed by the engine's close if that came first
        outcome = submitted[0].result().finish_reason
    except EngineClosedError:
        outcome = "engine closed"
    assert outcome in ("cancelled", "engine closed")
    st = Store(path)
    try:
        (turn,) = st.turns("inv-i")
        assert turn["source"] == "teacher:oracle/labeller" and turn["shadow_output"] is None
        assert st.rows("PRAGMA integrity_check")[0]["integrity_check"] == "ok"
    finally:
        st.close()


def test_a_failing_shadow_is_dropped_and_a_failing_teacher_cancels_it(tmp_path, tiny_model_path, caplog):
    register_oracle()
    register_broken_teacher()
    with Runtime(store_path=tmp_path / "j.sqlite3", engine_config=ONE_SLOT) as rt:
        rt.policy.configure("classify", teacher="oracle/labeller")
        blocker, submitted = hold_the_slot(rt, tiny_model_path)
        rt.calls.complete(taught_request(tiny_model_path, "inv-j"))
        assert_still_running(blocker)
        assert rt.shadows.pending == 1 and not submitted[0].cancelled
        with caplog.at_level(logging.DEBUG, logger="mtllm_locally.shadows"):
            rt.engines.get(tiny_model_path).close()  # the shadow fails under the waiting thread
            assert rt.shadows.wait(120)
        assert any("inv-j" in r.getMessage() and "EngineClosedError" in r.getMessage() for r in caplog.records)
        (turn,) = rt.store().turns("inv-j")
        assert turn["shadow_output"] is None and turn["output_text"] == answer_for(messages(3, "sky"))

    with Runtime(store_path=tmp_path / "k.sqlite3", engine_config=ONE_SLOT) as rt:
        rt.policy.configure("classify", teacher="broken/teacher")
        blocker, submitted = hold_the_slot(rt, tiny_model_path)
        for i, run in enumerate([rt.calls.complete, lambda r: asyncio.run(rt.calls.acomplete(r))]):
            with pytest.raises(Exception, match="the teacher is down"):
                run(taught_request(tiny_model_path, f"inv-k{i}"))
            assert len(submitted) == i + 1 and submitted[i].cancelled and rt.shadows.pending == 0
            assert rt.store().turns(f"inv-k{i}") == []
        assert_still_running(blocker)
        blocker.cancel()
        assert [r.result().finish_reason for r in submitted] == ["cancelled", "cancelled"]


def test_no_more_than_max_shadows_are_left_running(tmp_path, tiny_model_path):
    register_oracle()
    with Runtime(store_path=tmp_path / "l.sqlite3", engine_config=ONE_SLOT) as rt:
        rt.policy.configure("classify", teacher="oracle/labeller")
        rt.settings.max_shadows = 2
        blocker, submitted = hold_the_slot(rt, tiny_model_path)
        for i in range(3):
            rt.calls.complete(taught_request(tiny_model_path, f"inv-l{i}"))
        assert len(submitted) == 2 and rt.shadows.pending == 2  # the third call ran no shadow
        assert_still_running(blocker)
        blocker.cancel()
        assert rt.shadows.wait(120)
        shadows = [rt.store().turns(f"inv-l{i}")[0]["shadow_output"] for i in range(3)]
        assert shadows[0] and shadows[1] and shadows[2] is None


def register_broken_teacher() -> None:
    import litellm
    from litellm import CustomLLM

    class Broken(CustomLLM):
        def completion(self, *a, **kw):
            raise RuntimeError("the teacher is down")

        async def acompletion(self, *a, **kw):
            raise RuntimeError("the teacher is down")

    if not any(p.get("provider") == "broken" for p in litellm.custom_provider_map):
        litellm.custom_provider_map.append({"provider": "broken", "custom_handler": Broken()})
        from litellm.utils import custom_llm_setup

        custom_llm_setup()
