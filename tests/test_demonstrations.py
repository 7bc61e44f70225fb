"""Demonstrations: a task's labelled calls shown in the prompt, chosen and judged by
the loop before any training, served from the registry like an adapter."""

import json

import pytest

litellm = pytest.importorskip("litellm")

from loop_helpers import RF, fill_store, messages, register_oracle, word_of  # noqa: E402
from mtllm_locally import demonstrations, models  # noqa: E402
from mtllm_locally.demonstrations import Demonstration, plain_user_content, with_demonstrations  # noqa: E402
from mtllm_locally.learn.dataset import Example, task_examples  # noqa: E402
from mtllm_locally.learn.demonstrations import answer_group, choose  # noqa: E402
from mtllm_locally.learn.trigger import TaskRef, due, start_training  # noqa: E402
from mtllm_locally.state.policy import TaskPolicy  # noqa: E402
from mtllm_locally.state.registry import Registry  # noqa: E402
from runtime_helpers import own_runtime  # noqa: E402

SHOWN = (Demonstration("classify\n\nitem 1: sky", '{"schema_object_wrapper":2}'),
         Demonstration("classify\n\nitem 2: grass", '{"schema_object_wrapper":3}'))


def test_demonstrations_go_between_the_system_message_and_the_call():
    msgs = messages(7, "apple")
    out = with_demonstrations(msgs, SHOWN)
    assert out[0] == msgs[0] and out[-1] == msgs[-1]
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert out[1]["content"] == SHOWN[0].user and out[2]["content"] == SHOWN[0].answer
    assert with_demonstrations(msgs[1:], SHOWN)[0]["content"] == SHOWN[0].user  # no system message
    # other shapes are served as they are: tools, a conversation, no demonstrations
    assert with_demonstrations(msgs, SHOWN, tools=[{"type": "function"}]) is msgs
    convo = msgs + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]
    assert with_demonstrations(convo, SHOWN) is convo
    assert with_demonstrations(msgs, ()) is msgs
    assert plain_user_content(msgs) == msgs[1]["content"] and plain_user_content(convo) is None
    # byllm sends the user message as text parts: served and stored as they are
    parts = [{"type": "text", "text": "route\n\nticket = ('My printer...', '')"}, {"type": "text", "text": "Schema"}]
    byllm = [msgs[0], {"role": "user", "content": parts}]
    assert plain_user_content(byllm) == tuple(parts)
    shown = (Demonstration(tuple(parts), '{"schema_object_wrapper":1}'),)
    assert with_demonstrations(byllm, shown)[1] == {"role": "user", "content": parts}
    image = [msgs[0], {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert with_demonstrations(image, shown) is image


def test_the_file_round_trips_and_a_bad_one_is_refused(tmp_path):
    both = SHOWN + (Demonstration(({"type": "text", "text": "a"}, {"type": "text", "text": "b"}), "1"),)
    demonstrations.save(tmp_path / "d.json", both)
    assert demonstrations.load(tmp_path / "d.json") == both
    (tmp_path / "bad.json").write_text(json.dumps([{"user": 1}]))
    with pytest.raises(ValueError, match="not a list of demonstrations"):
        demonstrations.load(tmp_path / "bad.json")


def _example(i: int, label: int, heldout: bool = False, completion: str | None = None) -> Example:
    return Example(f"inv-{i}", f"k{i}", messages(i, word_of(i)), None, RF,
                   completion or json.dumps({"schema_object_wrapper": label}, separators=(",", ":")),
                   "teacher", float(i), heldout)


def test_choose_covers_every_answer_and_never_shows_a_held_out_input():
    # label 1 is common, 3 is rare: round-robin still shows it
    exs = [_example(i, 1) for i in range(20)] + [_example(20 + i, 2) for i in range(5)] + [_example(30, 3)]
    exs.append(_example(40, 4, heldout=True))
    picked = choose(exs, k=6)
    labels = [json.loads(e.completion)["schema_object_wrapper"] for e in picked]
    assert len(picked) == 6 and {1, 2, 3} <= set(labels) and 4 not in labels
    assert [e.created_at for e in picked] == sorted(e.created_at for e in picked)  # oldest first: stable prefix
    # the token budget bounds the block
    assert len(choose(exs, k=6, max_tokens=60, count_tokens=lambda s: 20)) == 1
    # objects are grouped by their keys and value types, not by their values
    a = answer_group('{"vendor":"Acme","total":12.5}')
    assert a == answer_group('{"vendor":"Bolt","total":3.0}') != answer_group('{"vendor":"Acme","total":null}')


def test_the_trigger_tries_demonstrations_first_then_trains_as_data_doubles(tmp_path, tiny_model_path):
    with own_runtime(tmp_path / "calls.sqlite3", learning=False) as rt:
        st, reg = rt.store(), Registry(rt.store())
        ref = TaskRef("classify:t", "classify", tiny_model_path)
        policy = TaskPolicy(min_new_examples=20, demonstrations=4, min_heldout=4, min_interval_s=0)
        fill_store(st, 5)
        d = due(st, reg, ref, policy)
        assert not d and "8 labelled" in d.why  # 4 shown + 4 to judge them on
        fill_store(st, 5, start=5)
        d = due(st, reg, ref, policy)
        assert d.kind == "demonstrations" and d.labelled == 10
        v = reg.reserve("classify:t", "b", config={"kind": "demonstrations", "labelled": 10})
        reg.finish(v.adapter_id, "rejected")
        assert not due(st, reg, ref, policy) and "20 labelled" in due(st, reg, ref, policy).why  # doubled
        fill_store(st, 25, start=10)
        train = [e for e in task_examples(st, "classify:t", heldout_percent=20) if not e.heldout]
        d = due(st, reg, ref, policy)
        assert d.kind == "training" and f"{len(train)} new training examples" in d.why  # held-out ones not counted
        v = reg.reserve("classify:t", "b", config={"kind": "training"})
        reg.finish(v.adapter_id, "failed")
        # a retraining waits for as many new training examples as the last one was trained on (>= min_new)
        with st.transaction() as db:
            db.execute("UPDATE adapters SET data_json=? WHERE adapter_id=?", (json.dumps({"n_train": 30}),
                                                                               v.adapter_id))
        i = 35
        while (new := len([e for e in task_examples(st, "classify:t", heldout_percent=20)
                           if not e.heldout and e.created_at > v.created_at])) < 29:
            fill_store(st, 1, start=i)
            i += 1
        d = due(st, reg, ref, policy)
        assert not d and "29 new training examples (a training needs 30)" in d.why
        assert "demonstrations" not in d.why  # after a training, demonstrations ride along with trainings
        while len([e for e in task_examples(st, "classify:t", heldout_percent=20)
                   if not e.heldout and e.created_at > v.created_at]) < 30:
            fill_store(st, 1, start=i)
            i += 1
        assert due(st, reg, ref, policy).kind == "training"


def test_a_demonstrations_job_judges_and_promotes_without_training(tmp_path, tiny_model_path):
    with own_runtime(tmp_path / "calls.sqlite3", learning=False) as rt:
        st, reg = rt.store(), Registry(rt.store())
        fill_store(st, 24)
        # margin -1: the gate passes whatever the score, so promotion is checked deterministically
        policy = TaskPolicy(demonstrations=4, min_heldout=4, margin=-1.0, threads=1)
        v, proc = start_training(st, TaskRef("classify:t", "classify", tiny_model_path), policy,
                                 kind="demonstrations", labelled=24, wait=True)
        assert proc.returncode == 0
        v = reg.get(v.adapter_id)
        assert v.status == "passed" and v.kind == "demonstrations", (v.error, v.metrics)
        assert v.serves_demonstrations and not v.serves_adapter and not v.gguf_path.exists()
        assert set(v.metrics["variants"]) == {"demonstrations"}
        assert v.metrics["judged_on"] == "held-out + unshown training examples"
        shown = demonstrations.load(v.demonstrations_path)
        held = {plain_user_content(e.messages) for e in task_examples(st, "classify:t") if e.heldout}
        assert len(shown) == 4 and not held & {d.user for d in shown}
        assert v.metrics["n_heldout"] == 24 - 4  # every unshown example judged
        assert reg.deployed("classify:t", models.fingerprint(tiny_model_path)).adapter_id == v.adapter_id


def test_a_deployed_version_with_demonstrations_serves_them_and_stores_the_programs_messages(
        tmp_path, tiny_model_path):
    register_oracle()
    with own_runtime(tmp_path / "calls.sqlite3", learning=False) as rt:
        st, reg = rt.store(), Registry(rt.store())

        def call(i):
            litellm.completion(model=f"mtllm_locally/{tiny_model_path}", messages=messages(i, "sky"),
                               response_format=RF, metadata={"jac_caller_name": "classify",
                                                             "jac_invocation_id": f"c-{i}"})
            return st.rows("SELECT * FROM turns WHERE invocation_id=?", (f"c-{i}",))[0]

        before = call(0)
        task = before["task_key"] if "task_key" in before else st.tasks()[0]["task_key"]
        v = reg.reserve(task, models.fingerprint(tiny_model_path), config={"kind": "demonstrations"})
        staging = reg.staging_dir(v)
        demonstrations.save(staging / demonstrations.FILE, SHOWN)
        reg.publish(v, staging, data={}, metrics={})
        reg.finish(v.adapter_id, "passed", metrics={"candidate_score": 0.5,
                                                    "serves": {"adapter": False, "demonstrations": True}})
        assert reg.promote(v.adapter_id)
        after = call(1)
        assert after["adapter"] == v.adapter_id
        assert json.loads(after["messages_json"]) == messages(1, "sky")  # the program's own messages
        shown_tokens = after["prompt_tokens"] - before["prompt_tokens"]
        assert shown_tokens > sum(len(d.user) + len(d.answer) for d in SHOWN) // 8  # the block was in the prompt
        eng = rt.engines.get(tiny_model_path)
        assert rt.router.loaded(eng) == {}  # no LoRA loaded for it

        # demonstrations alone never retire a teacher, whatever their score
        rt.policy.configure("classify", teacher="oracle/labeller", teacher_until=0.5)
        assert call(2)["source"] == "teacher:oracle/labeller"
        rt.policy.configure("classify", teacher=None)

        # a block that does not fit this engine's context is left out: the call still succeeds
        huge = (Demonstration("classify " + "word " * (eng.n_ctx + 100), '{"schema_object_wrapper":1}'),)
        v2 = reg.reserve(task, models.fingerprint(tiny_model_path), config={"kind": "demonstrations"})
        staging = reg.staging_dir(v2)
        demonstrations.save(staging / demonstrations.FILE, huge)
        reg.publish(v2, staging, data={}, metrics={})
        reg.finish(v2.adapter_id, "passed", metrics={"serves": {"adapter": False, "demonstrations": True}})
        assert reg.promote(v2.adapter_id)
        plain = call(3)
        assert plain["adapter"] == v2.adapter_id and plain["prompt_tokens"] == before["prompt_tokens"]


def test_training_takes_every_core_once_the_program_is_idle(tmp_path):
    import os
    import time

    from mtllm_locally.learn.worker import ThreadBudget

    with own_runtime(tmp_path / "calls.sqlite3", learning=False) as rt:
        st = rt.store()
        cores = os.cpu_count()
        assert ThreadBudget(st, 1, check_every_s=0)() == cores  # no call yet: nothing to leave cores to
        fill_store(st, 1)
        budget = ThreadBudget(st, 1, idle_after_s=0.5, check_every_s=0)
        assert budget() == min(1, cores)  # the program just called the model
        time.sleep(0.6)
        assert budget() == cores and budget.idle_answers == 1  # idle (or exited): every core
        fill_store(st, 1, start=1)
        assert budget() == 1  # it called again: back to the budget
        cached = ThreadBudget(st, 1, idle_after_s=0.5, check_every_s=3600)
        assert cached() == 1
        time.sleep(0.6)
        assert cached() == 1  # the store is read at most every check_every_s


def test_a_perfect_adapter_is_not_retrained_until_the_held_out_split_has_grown(tmp_path, tiny_model_path):
    with own_runtime(tmp_path / "calls.sqlite3", learning=False) as rt:
        st, reg = rt.store(), Registry(rt.store())
        ref = TaskRef("classify:t", "classify", tiny_model_path)
        policy = TaskPolicy(min_new_examples=10, min_interval_s=0, demonstrations=0)
        fill_store(st, 20)
        v = reg.reserve("classify:t", "b", config={"kind": "training"})
        staging = reg.staging_dir(v)
        (staging / "adapter.gguf").write_bytes(b"GGUF")
        reg.publish(v, staging, data={"n_train": 10}, metrics={})
        reg.finish(v.adapter_id, "passed", metrics={"candidate_score": 1.0, "n_heldout": 5})
        assert reg.promote(v.adapter_id)
        fill_store(st, 30, start=20)  # 50 calls: 9 held out (by the inputs' hashes), < 2 x 5
        d = due(st, reg, ref, policy)
        assert not d and "no candidate could beat it" in d.why and "(9 now)" in d.why
        fill_store(st, 60, start=50)  # 110 calls: 22 held out; new inputs may show its errors
        assert due(st, reg, ref, policy).kind == "training"


def test_the_learner_starts_the_most_useful_job_first(tmp_path, tiny_model_path):
    from mtllm_locally.learn.trigger import Due, _urgency

    with own_runtime(tmp_path / "calls.sqlite3", learning=False) as rt:
        reg = Registry(rt.store())
        v = reg.reserve("good:t", "b", config={"kind": "training"})
        reg.finish(v.adapter_id, "rejected")
        good, new = TaskRef("good:t", "good", tiny_model_path), TaskRef("new:t", "new", tiny_model_path)
        order = sorted([(_urgency(reg, good, Due("training", "")), "retrain good"),
                        (_urgency(reg, new, Due("training", "")), "first training of new"),
                        (_urgency(reg, new, Due("demonstrations", "")), "demonstrations of new")])
        assert [o[1] for o in order] == ["demonstrations of new", "first training of new", "retrain good"]
