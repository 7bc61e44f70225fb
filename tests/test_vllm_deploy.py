"""Scale-out to vLLM, end to end against an in-process server speaking vLLM's routes
(vllm_fake.py): configuration, pushing a promoted version (versioned name, listed before
traffic moves, judged there, old names drained), reconciling after crashes and restarts,
rollback, and calls routed to the server with capture and feedback as for local calls, and
falling back in process on any server failure."""

import asyncio
import json
import re
import subprocess

import pytest

pytest.importorskip("litellm")

from loop_helpers import RF, answer_for, messages  # noqa: E402
from mtllm_locally import EngineConfig, InvalidRequestError, models  # noqa: E402
from mtllm_locally.errors import AdapterLoadError  # noqa: E402
from mtllm_locally.learn import target_gate  # noqa: E402
from mtllm_locally.learn.dataset import Example  # noqa: E402
from mtllm_locally.learn.gate import EvalResult  # noqa: E402
from mtllm_locally.serve.pipeline import CallRequest, TextDelta  # noqa: E402
from mtllm_locally.serve.remote_calls import RemoteStreamBroken  # noqa: E402
from mtllm_locally.serve.runtime import Runtime  # noqa: E402
from mtllm_locally.state.policy import Policy, TaskPolicy, VLLMSettings  # noqa: E402
from mtllm_locally.state.registry import Registry  # noqa: E402
from mtllm_locally.state.remote import Deployer, RemoteError, loaded_names  # noqa: E402
from mtllm_locally.state.store import Store  # noqa: E402
from mtllm_locally.state.task import task_dirname, task_key  # noqa: E402
from mtllm_locally.state.vllm_target import VLLMError  # noqa: E402
from tiny_llama import build_tiny_llama, build_tiny_lora  # noqa: E402
from vllm_fake import FakeVLLM  # noqa: E402

CONFIG = EngineConfig(n_ctx=512, flash_attn=False)
MSGS = messages(0, "apple")
TASK = task_key("classify", MSGS, RF, None)
PASS = lambda dep, name, v: {"passed": True, "reason": "ok"}  # noqa: E731


@pytest.fixture
def fake():
    with FakeVLLM() as f:
        yield f


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("vllm") / "tiny.gguf"
    return str(path), build_tiny_llama(path)


def make_version(reg: Registry, base: str, weights, seed: int, *, score: float = 0.8, adapter: bool = True):
    v = reg.reserve(TASK, base, config={"policy": {}, "model_path": "", "function": "classify"})
    staging = reg.staging_dir(v)
    build_tiny_lora(staging / "adapter.gguf", weights, seed=seed, strength=0.5)
    (staging / "peft").mkdir()
    (staging / "peft" / "adapter_config.json").write_text("{}")
    (staging / "peft" / "adapter_model.safetensors").write_bytes(f"weights {seed}".encode())
    v = reg.publish(v, staging, data={"n_train": 0}, metrics={})
    reg.finish(v.adapter_id, "passed", metrics={"candidate_score": score,
                                                "serves": {"adapter": adapter, "demonstrations": False}})
    return reg.get(v.adapter_id)


def settings(fake, model: str, **kw) -> VLLMSettings:
    return VLLMSettings(**{"base_url": fake.url + "/v1", "served_base": fake.base, "model": model, "drain_s": 0.0,
                           **kw})


def promote(dep: Deployer, v) -> str:
    name, _ = dep.push(v, PASS)
    assert dep.registry.promote(v.adapter_id)
    dep.retire_others(v.task_key)
    return name


# ---------------------------------------------------------------------- configuration
def test_vllm_settings_merge_key_by_key_from_jac_toml_and_env(tmp_path, monkeypatch):
    (tmp_path / "jac.toml").write_text(
        '[plugins.mtllm_locally.vllm]\nbase_url = "http://10.0.0.5:8000/v1"\nserved_base = "smol"\n'
        '[plugins.mtllm_locally.tasks.classify.vllm]\nroute = false\n')
    monkeypatch.delenv("MTLLM_LOCALLY_VLLM_URL", raising=False)
    monkeypatch.delenv("MTLLM_LOCALLY_VLLM", raising=False)
    p = Policy(tmp_path)
    classify, other = p.for_task("classify").remote, p.for_task("summarize").remote
    assert classify.base_url == other.base_url == "http://10.0.0.5:8000/v1" and classify.served_base == "smol"
    assert classify.route is False and other.route is True and other.active
    monkeypatch.setenv("MTLLM_LOCALLY_VLLM", "0")
    assert not Policy(tmp_path).for_task("summarize").remote.active
    monkeypatch.delenv("MTLLM_LOCALLY_VLLM")
    monkeypatch.setenv("MTLLM_LOCALLY_VLLM_URL", "http://10.0.0.6:8000")
    assert Policy(tmp_path).for_task("classify").remote.base_url == "http://10.0.0.6:8000"
    with pytest.raises(InvalidRequestError, match="bogus"):
        TaskPolicy(vllm={"bogus": 1})
    with pytest.raises(InvalidRequestError, match="base_url"):
        TaskPolicy(vllm={"base_url": "10.0.0.5:8000"})
    (tmp_path / "jac.toml").write_text('[plugins.mtllm_locally.vllm]\nbase_urll = "http://x:1"\n')
    with pytest.raises(InvalidRequestError, match="base_urll"):
        Policy(tmp_path).for_task("classify")


# ---------------------------------------------------------------------- pushing
def test_push_loads_a_versioned_name_then_switch_retires_and_drains_the_old(tmp_path, fake, tiny):
    path, weights = tiny
    reg = Registry(Store(tmp_path / "s.sqlite3"))
    base = models.fingerprint(path)
    v1, v2 = make_version(reg, base, weights, 1), make_version(reg, base, weights, 2)
    dep = Deployer(reg, settings(fake, path, server_adapter_dir="/srv/adapters"))
    n1 = promote(dep, v1)
    assert re.fullmatch(re.escape(task_dirname(TASK)) + r"-v1-[0-9a-f]{8}", n1)
    assert fake.loaded[n1] == f"/srv/adapters/{task_dirname(TASK)}/v1/peft"  # how the server sees the registry
    assert loaded_names(reg) == {(fake.url, v1.adapter_id): n1}
    assert dep.push(v1, PASS)[0] == n1  # a retried push: same weights, same name, no error

    n2 = promote(dep, v2)
    assert n2 != n1 and set(fake.loaded) == {n1, n2}  # the old one drains
    rows = {r["name"]: r for r in dep.rows()}
    assert rows[n1]["retired_at"] is not None and rows[n2]["retired_at"] is None
    assert dep.reconcile()["unloaded"] == [n1]
    assert set(fake.loaded) == {n2} and {r["name"]: r["state"] for r in dep.rows()} == {n1: "unloaded", n2: "loaded"}
    actions = [(e["action"], e["adapter_id"]) for e in reg.log(TASK)]
    assert ("remote-load", v2.adapter_id) in actions and ("remote-unload", v1.adapter_id) in actions


def test_a_refused_load_or_a_failed_target_gate_leaves_nothing_loaded(tmp_path, fake, tiny):
    path, weights = tiny
    reg = Registry(Store(tmp_path / "s.sqlite3"))
    base = models.fingerprint(path)
    v1, v2 = make_version(reg, base, weights, 1), make_version(reg, base, weights, 2)
    dep = Deployer(reg, settings(fake, path))
    name, verdict = dep.push(v1, lambda d, n, v: {"passed": False, "reason": "0.2 < 0.8"})
    assert not verdict["passed"] and fake.loaded == {}
    row = dep.rows()[0]
    assert row["state"] == "unloaded" and "target gate: 0.2 < 0.8" in row["error"]
    assert loaded_names(reg) == {}
    fake.fail_load = True
    with pytest.raises(AdapterLoadError, match="bad rank"):
        dep.push(v2, PASS)
    assert fake.loaded == {} and {r["state"] for r in dep.rows() if r["adapter_id"] == v2.adapter_id} == {"failed"}
    fake.fail_load, fake.base = False, "another-base"
    with pytest.raises(RemoteError, match="base-f32"):  # the configured base must be served there
        dep.push(v2, PASS)
    assert fake.loaded == {}
    with pytest.raises(VLLMError, match="not reachable"):
        Deployer(reg, VLLMSettings(base_url="http://127.0.0.1:9", model=path)).push(v2, PASS)
    assert reg.deployed(TASK, base) is None  # nothing was promoted by any of it


def test_reconcile_reloads_what_a_restart_lost_and_cleans_up_after_a_dead_pusher(tmp_path, fake, tiny):
    path, weights = tiny
    reg = Registry(Store(tmp_path / "s.sqlite3"))
    base = models.fingerprint(path)
    v1, v2 = make_version(reg, base, weights, 1), make_version(reg, base, weights, 2)
    dep = Deployer(reg, settings(fake, path))
    n1 = promote(dep, v1)
    fake.forget()  # vLLM restarted: runtime LoRAs are gone
    assert dep.reconcile()["reloaded"] == [n1] and n1 in fake.loaded
    # a pusher killed between asking the server and recording it: its intent row remains
    dead = subprocess.Popen(["true"])
    dead.wait()
    n2 = Deployer.name_for(v2)
    dep._set(v2, n2, "loading", pid=dead.pid)
    fake.loaded[n2] = "/somewhere"
    assert dep.reconcile()["unloaded"] == [n2]
    assert set(fake.loaded) == {n1} and {r["name"]: r["state"] for r in dep.rows()}[n2] == "failed"


def test_rollback_loads_the_previous_version_before_the_pointer_moves(tmp_path, fake, tiny):
    path, weights = tiny
    reg = Registry(Store(tmp_path / "s.sqlite3"))
    base = models.fingerprint(path)
    v1, v2 = make_version(reg, base, weights, 1), make_version(reg, base, weights, 2)
    dep = Deployer(reg, settings(fake, path))
    n1, n2 = promote(dep, v1), promote(dep, v2)
    dep.reconcile()
    assert set(fake.loaded) == {n2}
    assert dep.rollback(TASK, base) == v1.adapter_id
    assert set(fake.loaded) == {n1, n2} and loaded_names(reg)[(fake.url, v1.adapter_id)] == n1
    dep.reconcile()
    assert set(fake.loaded) == {n1}
    fake.down = True  # a rollback never waits on the server: it moves, calls go in process
    assert dep.rollback(TASK, base) is None and reg.deployed(TASK, base) is None


# ---------------------------------------------------------------------- the target gate
def test_target_gate_judges_the_candidate_on_the_server_as_served(tmp_path, fake, tiny):
    path, weights = tiny
    reg = Registry(Store(tmp_path / "s.sqlite3"))
    v = make_version(reg, models.fingerprint(path), weights, 1)
    judged = [Example(f"inv-{i}", f"input-{i}", messages(i, w), None, RF, answer_for(messages(i, w)), "teacher", 0.0, True)
              for i, w in enumerate(["apple", "sky", "grass", "apple"])]
    candidate = EvalResult(score=1.0, exact=1.0, n=4, predictions=[e.completion for e in judged])
    baseline = EvalResult(score=0.25, exact=0.25, n=4, predictions=["x"] * 4)
    policy = TaskPolicy(margin=0.05, vllm={"base_url": fake.url, "served_base": fake.base, "model": path})
    fake.answer = lambda model, body: answer_for(body["messages"]) if model != fake.base else "{}"
    serves = {"adapter": True, "demonstrations": False}
    record = target_gate.push(reg, v, serves, policy, judged, [16] * 4, (), candidate, baseline, log=lambda m: None)
    assert record["state"] == "served" and record["score"] == 1.0 and record["agreement_with_local"] == 1.0
    chat = fake.chats(record["name"])[0]
    assert chat["temperature"] == 0.0 and chat["max_tokens"] == 16 and chat["response_format"]["type"] == "json_schema"
    fake.answer = lambda model, body: json.dumps({"schema_object_wrapper": 2})  # right once in four
    v2 = make_version(reg, models.fingerprint(path), weights, 2)
    record = target_gate.push(reg, v2, serves, policy, judged, [16] * 4, (), candidate, baseline, log=lambda m: None)
    assert record["state"] == "rejected" and record["score"] == 0.25 and record["name"] not in fake.loaded
    fake.fail_chat = True  # a server that answers nothing is no verdict on the adapter
    v3 = make_version(reg, models.fingerprint(path), weights, 3)
    record = target_gate.push(reg, v3, serves, policy, judged, [16] * 4, (), candidate, baseline, log=lambda m: None)
    assert record["state"] == "unavailable"


# ---------------------------------------------------------------------- routing calls
def routed_runtime(tmp_path, fake, tiny, **vllm):
    path, weights = tiny
    store_path = tmp_path / "s.sqlite3"
    reg = Registry(Store(store_path))
    v = make_version(reg, models.fingerprint(path), weights, 1)
    name = promote(Deployer(reg, settings(fake, path)), v)
    policy = Policy(tmp_path)
    policy.configure(vllm={"base_url": fake.url, "served_base": fake.base, "model": path, **vllm})
    return Runtime(store_path=store_path, engine_config=CONFIG, policy=policy), v, name


def call(path, inv, **kw):
    return CallRequest(model=path, messages=MSGS, response_format=RF, sampling={"max_tokens": 12},
                       metadata={"jac_caller_name": "classify", "jac_invocation_id": inv}, **kw)


def test_calls_go_to_the_server_and_are_captured_like_local_ones(tmp_path, fake, tiny):
    path = tiny[0]
    fake.answer = lambda model, body: json.dumps({"schema_object_wrapper": 3})
    rt, v, name = routed_runtime(tmp_path, fake, tiny)
    with rt:
        ans = rt.calls.complete(call(path, "inv-1"))
        assert ans.served_by == f"hosted_vllm/{name}" and ans.adapter == v.adapter_id
        assert ans.choices[0].text == '{"schema_object_wrapper": 3}'
        sent = fake.chats(name)[0]
        assert sent["messages"] == MSGS and sent["temperature"] == 0.0 and sent["max_tokens"] == 12
        assert sent["response_format"]["json_schema"]["schema"] == RF["json_schema"]["schema"]
        turn = rt.store().turns("inv-1")[0]
        assert (turn["model"], turn["adapter"], turn["source"]) == (f"hosted_vllm/{name}", v.adapter_id, "model")
        rt.feedback("inv-1", corrected_output={"schema_object_wrapper": 1})
        assert rt.store().rows("SELECT corrected_output FROM feedback WHERE invocation_id='inv-1'")
        # the server fails: the call is answered in process (with the deployed adapter), and
        # the server is left alone for a while
        fake.fail_chat = True
        local = rt.calls.complete(call(path, "inv-2"))
        assert local.served_by is None and local.adapter == v.adapter_id and local.choices[0].text
        assert rt.store().turns("inv-2")[0]["model"].startswith("mtllm_locally/")
        n = len(fake.chats())
        rt.calls.complete(call(path, "inv-3"))
        assert len(fake.chats()) == n


def test_stream_and_async_calls_go_to_the_server_too(tmp_path, fake, tiny):
    path = tiny[0]
    fake.answer = lambda model, body: '{"schema_object_wrapper": 2}'
    rt, v, name = routed_runtime(tmp_path, fake, tiny)
    with rt:
        events = list(rt.calls.stream(call(path, "inv-s")))
        deltas = "".join(e.text for e in events if isinstance(e, TextDelta))
        assert deltas == '{"schema_object_wrapper": 2}' == events[-1].choices[0].text
        assert events[-1].served_by == f"hosted_vllm/{name}"
        ans = asyncio.run(rt.calls.acomplete(call(path, "inv-a")))
        assert ans.served_by == f"hosted_vllm/{name}" and ans.choices[0].text == '{"schema_object_wrapper": 2}'
        fake.break_stream_after = 2  # half an answer was shown: it cannot be taken back
        with pytest.raises(RemoteStreamBroken):
            list(rt.calls.stream(call(path, "inv-b")))
        fake.break_stream_after, fake.finish_reason = None, "length"  # shown, then found cut: not shown twice
        with pytest.raises(RemoteStreamBroken, match="budget"):
            list(rt.calls.stream(call(path, "inv-c")))


def test_tools_retries_and_opted_out_tasks_stay_in_process(tmp_path, fake, tiny):
    path = tiny[0]
    rt, v, name = routed_runtime(tmp_path, fake, tiny)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    with rt:
        rt.calls.complete(CallRequest(model=path, messages=MSGS, tools=tools, sampling={"max_tokens": 12},
                                      metadata={"jac_caller_name": "classify", "jac_invocation_id": "inv-t"}))
        assert fake.chats() == []
        rt.calls.complete(call(path, "inv-r"))
        rt.store().finish_call("inv-r", accepted=False)
        assert len(fake.chats()) == 1
        retry = rt.calls.complete(call(path, "inv-r"))  # byllm asks again: the engine's retry sampling
        assert retry.served_by is None and len(fake.chats()) == 1
        rt.policy.configure("classify", vllm={"route": False})
        assert rt.calls.complete(call(path, "inv-o")).served_by is None and len(fake.chats()) == 1


# ---------------------------------------------------------------------- the learning loop
def test_the_loop_promotes_only_what_the_server_took(tmp_path, fake, tiny_model_path):
    """A demonstrations job (no torch) with a vLLM server configured: the base there serves
    the demonstrations; judged on the server, then promoted; with the server failing, the
    version passes locally but is not promoted (`required`)."""
    from loop_helpers import fill_store
    from mtllm_locally.learn.trigger import TaskRef, start_training
    from runtime_helpers import own_runtime

    fake.answer = lambda model, body: answer_for(body["messages"]) if len(body["messages"]) > 2 else "{}"
    with own_runtime(tmp_path / "calls.sqlite3", learning=False) as rt:
        st, reg = rt.store(), Registry(rt.store())
        fill_store(st, 24)
        policy = TaskPolicy(demonstrations=4, min_heldout=4, margin=-1.0, threads=1,
                            vllm={"base_url": fake.url, "served_base": fake.base, "model": tiny_model_path})
        ref = TaskRef("classify:t", "classify", tiny_model_path)
        v, proc = start_training(st, ref, policy, kind="demonstrations", labelled=24, wait=True)
        v = reg.get(v.adapter_id)
        assert proc.returncode == 0 and v.status == "passed", (v.error, v.metrics)
        remote = v.metrics["remote"]
        assert remote["state"] == "served" and remote["name"] == fake.base and remote["score"] == 1.0
        assert len(fake.chats()) == v.metrics["n_heldout"]  # every judged example, with the demonstrations
        assert reg.deployed("classify:t", models.fingerprint(tiny_model_path)).adapter_id == v.adapter_id

        fake.fail_chat = True
        fill_store(st, 24, start=24)
        v2, proc = start_training(st, ref, policy, kind="demonstrations", labelled=48, wait=True)
        v2 = reg.get(v2.adapter_id)
        assert proc.returncode == 0 and v2.status == "passed" and v2.metrics["remote"]["state"] == "unavailable"
        assert reg.deployed("classify:t", models.fingerprint(tiny_model_path)).adapter_id == v.adapter_id


def test_a_teacher_still_answers_while_the_student_is_not_good_enough(tmp_path, fake, tiny):
    """Teacher mode is unchanged by a server: the teacher answers and is captured as the
    label, the student runs in shadow in process, and nothing is sent to the server."""
    from loop_helpers import register_oracle

    register_oracle()
    path = tiny[0]
    rt, v, name = routed_runtime(tmp_path, fake, tiny)
    with rt:
        rt.policy.configure("classify", teacher="oracle/x", teacher_until=0.99)
        ans = rt.calls.complete(call(path, "inv-teach"))
        assert ans.source == "teacher:oracle/x" and ans.served_by is None
        assert ans.choices[0].text == answer_for(MSGS) and fake.chats() == []
        assert rt.store().turns("inv-teach")[0]["source"] == "teacher:oracle/x"


def test_cli_promote_rollback_and_sync_go_through_the_server(tmp_path, fake, tiny, monkeypatch, capsys):
    from mtllm_locally import cli

    path, weights = tiny
    store_path = tmp_path / "s.sqlite3"
    reg = Registry(Store(store_path))
    base = models.fingerprint(path)
    v1, v2 = make_version(reg, base, weights, 1), make_version(reg, base, weights, 2)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jac.toml").write_text(f'[plugins.mtllm_locally.vllm]\nmodel = "{path}"\n')
    monkeypatch.setenv("MTLLM_LOCALLY_VLLM_URL", fake.url)
    for v in (v1, v2):
        assert cli.main(["--store", str(store_path), "promote", v.adapter_id]) == 0
    n1, n2 = Deployer.name_for(v1), Deployer.name_for(v2)
    assert set(fake.loaded) == {n1, n2} and reg.deployed(TASK, base).adapter_id == v2.adapter_id
    assert cli.main(["--store", str(store_path), "--json", "vllm", "sync", "--now"]) == 0
    (entry,) = json.loads(capsys.readouterr().out.split("now serves its task\n")[-1])
    assert entry["sync"]["unloaded"] == [n1] and set(entry["served"]) == {fake.base, n2}
    fake.fail_load = True  # a promotion the server cannot take does not happen
    assert cli.main(["--store", str(store_path), "promote", v1.adapter_id]) == 2
    assert reg.deployed(TASK, base).adapter_id == v2.adapter_id
    monkeypatch.setenv("MTLLM_LOCALLY_VLLM", "0")
    assert cli.main(["--store", str(store_path), "vllm", "status"]) == 2  # nothing configured: said so


# ---------------------------------------------------------------------- what the review found
def test_a_reconcile_elsewhere_during_the_target_gate_leaves_the_candidate_loaded(tmp_path, fake, tiny):
    """The serving process reconciles every minute while a worker judges its candidate on the
    server: the candidate must survive it and serve once promoted."""
    path, weights = tiny
    reg = Registry(Store(tmp_path / "s.sqlite3"))
    base = models.fingerprint(path)
    v1, v2 = make_version(reg, base, weights, 1), make_version(reg, base, weights, 2)
    dep = Deployer(reg, settings(fake, path))
    promote(dep, v1)
    other = Deployer(Registry(Store(tmp_path / "s.sqlite3")), settings(fake, path))  # the serving process

    def gate(d, name, v):
        other.reconcile(tasks={TASK})
        other.reconcile(tasks={TASK})
        assert name in fake.loaded  # still there to be judged
        return {"passed": True, "reason": "ok"}
    n2, _ = dep.push(v2, gate)
    assert reg.promote(v2.adapter_id)
    dep.retire_others(TASK)
    other.reconcile(tasks={TASK})
    assert n2 in fake.loaded and loaded_names(reg)[(fake.url, v2.adapter_id)] == n2
    # a version deployed while the server was not configured (or down) is loaded by reconcile
    reg.rollback(TASK, base)
    dep._set(v1, Deployer.name_for(v1), "unloaded")
    fake.loaded.pop(Deployer.name_for(v1), None)
    assert other.reconcile(tasks={TASK})["loaded"] == [Deployer.name_for(v1)]


def test_a_failed_call_during_the_target_gate_is_no_verdict(tmp_path, fake, tiny):
    path, weights = tiny
    reg = Registry(Store(tmp_path / "s.sqlite3"))
    judged = [Example(f"inv-{i}", f"input-{i}", messages(i, w), None, RF, answer_for(messages(i, w)), "teacher", 0.0, True)
              for i, w in enumerate(["apple", "sky", "grass", "apple"])]
    candidate = EvalResult(score=1.0, exact=1.0, n=4, predictions=[e.completion for e in judged])
    baseline = EvalResult(score=0.25, exact=0.25, n=4, predictions=["x"] * 4)
    policy = TaskPolicy(vllm={"base_url": fake.url, "served_base": fake.base, "model": path})
    fake.answer = lambda model, body: answer_for(body["messages"])
    serves = {"adapter": True, "demonstrations": False}
    fake.fail_next = 1  # one failure, retried: still a verdict
    v = make_version(reg, models.fingerprint(path), weights, 1)
    assert target_gate.push(reg, v, serves, policy, judged, [16] * 4, (), candidate, baseline,
                            log=lambda m: None)["state"] == "served"
    fake.fail_next = 8  # a call that fails twice: not judged, not rejected
    v2 = make_version(reg, models.fingerprint(path), weights, 2)
    record = target_gate.push(reg, v2, serves, policy, judged, [16] * 4, (), candidate, baseline, log=lambda m: None)
    assert record["state"] == "unavailable" and reg.get(v2.adapter_id).status == "passed"


def test_a_refused_or_cut_call_is_served_here_without_blaming_the_server(tmp_path, fake, tiny):
    path = tiny[0]
    rt, v, name = routed_runtime(tmp_path, fake, tiny)
    with rt:
        fake.fail_status, fake.fail_next = 400, 1  # e.g. longer than the server's context
        assert rt.calls.complete(call(path, "inv-400")).served_by is None
        assert rt.calls.complete(call(path, "inv-next")).served_by == f"hosted_vllm/{name}"  # not marked down
        fake.finish_reason = "length"  # a typed answer the server cut at the budget: not taken
        cut = rt.calls.complete(call(path, "inv-cut"))
        assert cut.served_by is None and rt.store().turns("inv-cut")[0]["model"].startswith("mtllm_locally/")
        fake.finish_reason, fake.fail_status, fake.fail_next = "stop", 404, 1  # a name the server lost
        assert rt.calls.complete(call(path, "inv-404")).served_by is None
        n = len(fake.chats())
        assert rt.calls.complete(call(path, "inv-after")).served_by is None and len(fake.chats()) == n


def test_calls_of_another_model_stay_here_and_credentials_and_the_switch_are_safe(tmp_path, fake, tiny, monkeypatch):
    import shutil

    path = tiny[0]
    other = tmp_path / "other.gguf"
    shutil.copy(path, other)  # the same bytes under another name: another model to the registry
    rt, v, name = routed_runtime(tmp_path, fake, tiny, served_base=fake.base)
    with rt:
        assert rt.calls.complete(call(str(other), "inv-other")).served_by is None and fake.chats() == []
    with pytest.raises(InvalidRequestError, match="credentials"):
        VLLMSettings(base_url="http://user:s3cret@10.0.0.5:8000/v1")
    from mtllm_locally.serve.remote_calls import Remote

    assert "s3cret" not in repr(Remote("http://h:1", "n", "s3cret"))  # a Route in a log shows no key
    (tmp_path / "jac.toml").write_text('[plugins.mtllm_locally.tasks.classify.vllm]\nbase_url = "http://b:2"\n'
                                       'enabled = true\n')
    monkeypatch.setenv("MTLLM_LOCALLY_VLLM", "0")  # the switch wins over every table
    assert not Policy(tmp_path).for_task("classify").remote.active


def test_a_vllm_model_that_is_not_here_keeps_calls_local_and_says_so_once(tmp_path, fake, tiny, caplog):
    path = tiny[0]
    rt, v, name = routed_runtime(tmp_path, fake, tiny, model=str(tmp_path / "missing.gguf"))
    with rt, caplog.at_level("WARNING", logger="mtllm_locally.runtime"):
        for i in range(3):
            assert rt.calls.complete(call(path, f"inv-m{i}")).served_by is None
    assert fake.chats() == []
    assert sum("is not a model here" in r.getMessage() for r in caplog.records) == 1
