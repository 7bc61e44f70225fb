"""The self-improving loop end to end on the tiny model: calls captured (a teacher
answering) -> the trigger fires -> a training process trains -> the gate judges it
against the base through the engine -> promotion -> the running engine routes the
task to the new adapter -> a bad candidate is rejected -> rollback."""

import json
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
litellm = pytest.importorskip("litellm")

from loop_helpers import RF, answer_for, messages, register_oracle, wait_for, word_of  # noqa: E402
from mtllm_locally import models  # noqa: E402
from mtllm_locally.learn.trigger import TaskRef, start_training  # noqa: E402
from mtllm_locally.state.registry import Registry  # noqa: E402
from runtime_helpers import own_runtime  # noqa: E402

# Small enough for CI, large enough that the tiny model can learn word -> label.
TEACHER = dict(teacher="oracle/labeller", teacher_until=0.0)
# 60 calls hold 51 training examples (9 held out, by the hash of each input): the first training
# starts when the 60th call is in. Demonstrations are tested on their own (test_demonstrations).
POLICY = dict(min_new_examples=51, demonstrations=0, min_interval_s=0.0, threads=1,
              min_heldout=4, margin=0.05, train={"learning_rate": 1e-2, "rank": 8, "alpha": 16, "bf16": False})


@pytest.fixture
def rt(tmp_path, tiny_model_path):
    register_oracle()
    with own_runtime(tmp_path / "calls.sqlite3") as runtime:
        runtime.policy.reset()
        runtime.policy.configure(**POLICY)
        runtime.policy.configure("classify", **TEACHER)  # other tasks have no teacher
        runtime.settings.max_shadows = 64  # every call's student runs in shadow (step 1 checks them all)
        yield runtime


def call(rt, model_path, i, word=None):
    word = word or word_of(i)
    r = litellm.completion(model=f"mtllm_locally/{model_path}", messages=messages(i, word), response_format=RF,
                           metadata={"jac_caller_name": "classify", "jac_invocation_id": f"inv-{i}"})
    rt.finish_call(f"inv-{i}", accepted=True)  # byllm's verdict, as the Jac plugin records it
    return r.choices[0].message.content


def test_calls_to_promoted_adapter_and_rollback(rt, tiny_model_path):
    st = rt.store()
    reg = Registry(st)
    eng = rt.engines.get(tiny_model_path)
    base = models.fingerprint(tiny_model_path)

    # 1. While no adapter is deployed, the teacher answers and the student runs in shadow.
    for i in range(60):
        assert json.loads(call(rt, tiny_model_path, i)) == json.loads(answer_for(messages(i, word_of(i))))
    assert rt.shadows.wait(240)  # the students finish after their calls returned
    rows = st.rows("SELECT source, shadow_output, adapter FROM turns")
    assert len(rows) == 60 and all(r["source"] == "teacher:oracle/labeller" for r in rows)
    assert all(r["shadow_output"] and r["shadow_output"].startswith("{") for r in rows)
    task = st.tasks()[0]["task_key"]

    # 2. The trigger fires on its own; the worker trains, gates and promotes.
    v1 = wait_for(lambda: next((v for v in reg.versions(task) if v.status not in ("training",)), None), 240,
                  "the first training to finish")
    assert v1.status == "passed", (v1.error, v1.metrics)
    assert v1.metrics["candidate_score"] >= v1.metrics["baseline_score"] + 0.05
    assert reg.deployed(task, base).adapter_id == v1.adapter_id
    assert v1.data["n_train"] + v1.data["n_heldout"] == 60 and v1.data["n_heldout"] >= 4
    assert (v1.gguf_path.is_file() and (v1.gguf_path.parent / "peft" / "adapter_config.json").is_file()
            and json.loads((v1.gguf_path.parent / "manifest.json").read_text())["base"] == base)

    # 3. The running engine routes the task to it, without a restart; the teacher stops.
    out = call(rt, tiny_model_path, 1000, "sky")
    last = st.rows("SELECT adapter, source FROM turns ORDER BY id DESC LIMIT 1")[0]
    assert last == {"adapter": v1.adapter_id, "source": "model"}
    assert v1.adapter_id in rt.router.loaded(eng)
    assert json.loads(out)["schema_object_wrapper"] in (1, 2, 3)
    # another task on the same engine is untouched
    other = litellm.completion(model=f"mtllm_locally/{tiny_model_path}", max_tokens=4,
                               messages=[{"role": "user", "content": "hi"}],
                               metadata={"jac_caller_name": "greet", "jac_invocation_id": "g-1"})
    assert other.choices[0].message.content is not None
    assert st.rows("SELECT adapter FROM turns WHERE invocation_id='g-1'")[0]["adapter"] is None

    # 4. A deliberately bad candidate (a learning rate that wrecks the model) is rejected.
    rt.policy.configure("classify", train={"learning_rate": 5.0, "epochs": 3, "bf16": False})
    v2, proc = start_training(st, TaskRef(task, "classify", tiny_model_path), rt.policy.for_task("classify"),
                              wait=True)
    v2 = reg.get(v2.adapter_id)
    assert v2.status == "rejected" and v2.metrics["candidate_score"] < v2.metrics["baseline_score"] + 0.05
    assert v2.metrics["baseline"] == v1.adapter_id
    assert reg.deployed(task, base).adapter_id == v1.adapter_id

    # 5. Rollback: the base model serves the task again, in the running process.
    assert reg.rollback(task, base) is None
    call(rt, tiny_model_path, 1001, "apple")
    assert st.rows("SELECT adapter FROM turns ORDER BY id DESC LIMIT 1")[0]["adapter"] is None
    wait_for(lambda: v1.adapter_id not in rt.router.loaded(eng), 10, "the rolled-back adapter to unload")
    # ... and promoting v1 again is a manual decision the registry records
    assert reg.promote(v1.adapter_id)
    assert [r["action"] for r in reg.log(task)] == ["promote", "rollback", "promote"]


def test_trigger_waits_for_enough_new_examples(rt, tiny_model_path):
    from mtllm_locally.learn.trigger import due

    from loop_helpers import fill_store

    st = rt.store()
    reg = Registry(st)
    ref = TaskRef("classify:t", "classify", tiny_model_path)
    fill_store(st, 10)
    ok, why = due(st, reg, ref, rt.policy.for_task("classify"))
    assert not ok and "10 calls since the last training" in why
    # the model's own accepted answers are not labels under the default policy
    st.record_turn(invocation_id="own", task_key="classify:t", function="classify", model="m",
                   messages=messages(99, "sky"), response_format=RF, output_text='{"schema_object_wrapper":1}',
                   finish_reason="stop", latency_ms=1, prompt_tokens=1, completion_tokens=1)
    st.finish_call("own", accepted=True)
    assert not due(st, reg, ref, rt.policy.for_task("classify"))
    fill_store(st, 49, start=10)  # 60 calls, but one is the model's own: 59 examples, 50 of them training
    assert "50 new training examples" in due(st, reg, ref, rt.policy.for_task("classify")).why
    assert not due(st, reg, ref, rt.policy.for_task("classify"))
    fill_store(st, 1, start=59)
    assert due(st, reg, ref, rt.policy.for_task("classify"))
    rt.policy.configure("classify", learn=False)
    assert not due(st, reg, ref, rt.policy.for_task("classify"))


def test_feedback_shapes_the_dataset(rt):
    from mtllm_locally.learn.dataset import task_examples

    from loop_helpers import fill_store

    st = rt.store()
    fill_store(st, 6)
    st.add_feedback("inv-classify:t-0", correct=False)                        # wrong: dropped
    st.add_feedback("inv-classify:t-1", corrected_output=3)                   # corrected: wrapped, compact
    st.add_feedback("inv-classify:t-2", correct=True)                         # confirmed
    exs = {e.invocation_id: e for e in task_examples(st, "classify:t", heldout_percent=20)}
    assert "inv-classify:t-0" not in exs
    assert exs["inv-classify:t-1"].completion == '{"schema_object_wrapper":3}'
    assert exs["inv-classify:t-1"].label == "corrected" and exs["inv-classify:t-2"].label == "confirmed"
    # the same input again: deduplicated, the better-vouched one wins
    st.record_turn(invocation_id="dup", task_key="classify:t", function="classify", model="oracle/x",
                   messages=messages(1, word_of(1)), response_format=RF, output_text='{"schema_object_wrapper":2}',
                   finish_reason="stop", latency_ms=1, prompt_tokens=1, completion_tokens=1, source="teacher:o")
    st.finish_call("dup", accepted=True)
    again = task_examples(st, "classify:t", heldout_percent=20)
    assert len(again) == 5 and not any(e.invocation_id == "dup" for e in again)
    # the split is a function of the input alone: stable across reads and percent-monotone
    held = {e.input_key for e in again if e.heldout}
    assert held == {e.input_key for e in task_examples(st, "classify:t", heldout_percent=20) if e.heldout}
    assert held <= {e.input_key for e in task_examples(st, "classify:t", heldout_percent=60) if e.heldout}


def test_teacher_json_is_trained_in_the_form_the_engine_emits(rt):
    from mtllm_locally.learn.dataset import completion_for, task_examples

    st = rt.store()
    st.record_turn(invocation_id="spaced", task_key="classify:t", function="classify", model="oracle/x",
                   messages=messages(5, "sky"), response_format=RF, output_text='{ "schema_object_wrapper": 2 }',
                   finish_reason="stop", latency_ms=1, prompt_tokens=1, completion_tokens=1, source="teacher:o")
    st.finish_call("spaced", accepted=True)
    (ex,) = task_examples(st, "classify:t")
    assert ex.completion == '{"schema_object_wrapper":2}'
    assert completion_for("free text", {"type": "text"}) == "free text"
    assert completion_for({"b": 1, "a": 2}, {"type": "json_schema", "json_schema": {"schema": {
        "properties": {"a": {}, "b": {}}}}}) == '{"a":2,"b":1}'
