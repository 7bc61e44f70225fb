"""Crash safety and sharing: kill the training process at random points, kill a
process in the middle of promotions, run programs side by side on one store. After
each kill the registry must be consistent and serving must go on with the last good
adapter."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from loop_helpers import fill_store  # noqa: E402
from mtllm_locally import Engine, models  # noqa: E402
from mtllm_locally import EngineConfig  # noqa: E402
from mtllm_locally.learn.trigger import TaskRef, start_training  # noqa: E402
from mtllm_locally.serve.router import Router  # noqa: E402
from mtllm_locally.serve.runtime import Runtime  # noqa: E402
from mtllm_locally.state.policy import Policy  # noqa: E402
from mtllm_locally.state.registry import Registry, RegistryError  # noqa: E402
from mtllm_locally.state.store import Store  # noqa: E402
from mtllm_locally.state.task import task_dirname  # noqa: E402

policy = Policy()
from tiny_llama import build_tiny_llama, build_tiny_lora  # noqa: E402

TASK = "classify:t"


def assert_consistent(reg: Registry, base: str) -> None:
    """The invariants a crash must never break."""
    versions = reg.versions(TASK)
    assert [v.version for v in versions] == list(range(1, len(versions) + 1))  # never reused, no gaps
    assert not [v for v in versions if v.status == "training"], "a dead training still shows as running"
    task_dir = reg.root / task_dirname(TASK)
    assert task_dir.parent == reg.root
    assert not list(task_dir.glob("*.tmp*")) if task_dir.exists() else True, "staging left behind"
    current = reg.deployed(TASK, base)
    log = [r for r in reg.log(TASK) if r["base"] == base]
    assert (log[-1]["adapter_id"] if log else None) == (current.adapter_id if current else None)
    if current is not None:
        assert current.status in ("passed", "rejected") and current.gguf_path.is_file()
        assert json.loads((current.gguf_path.parent / "manifest.json").read_text())["adapter_id"] == current.adapter_id


def serve_once(model_path, store, router=None):
    """What a program does on its next call: route the task and generate with it."""
    router = router or Router()
    with Engine(model_path, flash_attn=False, n_ctx=512) as eng:
        router.refresh(store)
        route = router.route(eng, TASK)
        out = eng.generate(messages=[{"role": "user", "content": "item 1: sky"}], max_tokens=4,
                           adapters=list(route.adapters))
        assert out.completion_tokens > 0
        return route.adapter_id


@pytest.fixture
def store(tmp_path):
    policy.reset()
    policy.configure(min_new_examples=10, min_interval_s=0, threads=1, min_heldout=1, margin=-1.0,
                     train={"epochs": 2, "bf16": False, "learning_rate": 1e-2})
    s = Store(tmp_path / "calls.sqlite3")
    fill_store(s, 40, TASK)
    yield s
    s.close()
    policy.reset()


def test_kill_training_at_random_points(store, tiny_model_path):
    reg = Registry(store)
    base = models.fingerprint(tiny_model_path)
    ref = TaskRef(TASK, "classify", tiny_model_path)
    rng = random.Random(1234)
    outcomes = []
    for delay in sorted(rng.uniform(0.0, 12.0) for _ in range(4)):
        v, proc = start_training(store, ref, policy.for_task("classify"))
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reg.reap()
        outcomes.append((round(delay, 1), reg.get(v.adapter_id).status))
        assert_consistent(reg, base)
        serve_once(tiny_model_path, store)
    assert any(status == "failed" for _, status in outcomes), outcomes
    # a training after the crashes gets a fresh number and completes
    v, proc = start_training(store, ref, policy.for_task("classify"), wait=True)
    assert v.version == len(outcomes) + 1 and reg.get(v.adapter_id).status in ("passed", "rejected")
    assert_consistent(reg, base)


def test_sigterm_cancels_cleanly(store, tiny_model_path):
    reg = Registry(store)
    v, proc = start_training(store, TaskRef(TASK, "classify", tiny_model_path), policy.for_task("classify"))
    time.sleep(6)
    proc.terminate()
    assert proc.wait(timeout=60) in (0, 3)
    assert reg.get(v.adapter_id).status in ("cancelled", "passed", "rejected")
    assert_consistent(reg, models.fingerprint(tiny_model_path))


def _complete_version(reg: Registry, base: str, weights, seed: int):
    v = reg.reserve(TASK, base, config={"policy": {}, "model_path": ""})
    staging = reg.staging_dir(v)
    build_tiny_lora(staging / "adapter.gguf", weights, seed=seed, strength=0.5)
    (staging / "peft").mkdir()
    v = reg.publish(v, staging, data={"n_train": 0}, metrics={})
    reg.finish(v.adapter_id, "passed", metrics={"candidate_score": 0.5 + seed / 10})
    return v.adapter_id


PROMOTER = textwrap.dedent("""
    import itertools
    from mtllm_locally.state.store import Store
    from mtllm_locally.state.registry import Registry
    reg = Registry(Store({store!r}))
    ids = {ids!r}
    print("ready", flush=True)
    for i in itertools.count():
        reg.promote(ids[i % len(ids)], note="stress")
        if i % 3 == 2:
            reg.rollback({task!r}, {base!r}, note="stress")
""")


def test_kill_during_promotion(store, tiny_model_path, tmp_path):
    reg = Registry(store)
    base = models.fingerprint(tiny_model_path)
    weights = build_tiny_llama(tmp_path / "same-weights.gguf")
    ids = [_complete_version(reg, base, weights, seed) for seed in (1, 2)]
    router = Router()
    rng = random.Random(7)
    served = set()
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", PROMOTER.format(store=str(store.path), ids=ids,
                                                                       task=TASK, base=base)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        fresh = Store(store.path)  # another program opening the store after the crash
        assert_consistent(Registry(fresh), base)
        current = Registry(fresh).deployed(TASK, base)
        served.add(serve_once(tiny_model_path, fresh, router))
        assert served and (current.adapter_id if current else None) in served
        fresh.close()
    assert len(reg.log(TASK)) > 10  # the promoter really was mid-stream when killed


RESERVER = textwrap.dedent("""
    import sys, time
    from mtllm_locally.state.store import Store
    from mtllm_locally.state.registry import Registry, RegistryError
    reg = Registry(Store({store!r}))
    sys.stdout.write("go\\n"); sys.stdout.flush()
    sys.stdin.readline()
    try:
        v = reg.reserve({task!r}, "base@x")
        print("won", v.adapter_id, flush=True)
        time.sleep(3)  # hold it, alive, while the others try
    except RegistryError as e:
        print("busy", flush=True)
""")


def test_one_training_at_a_time_across_processes(store):
    procs = [subprocess.Popen([sys.executable, "-c", RESERVER.format(store=str(store.path), task=TASK)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        assert p.stdout.readline().strip() == "go"
    for p in procs:  # release them together
        p.stdin.write("\n")
        p.stdin.flush()
    results = [p.stdout.readline().split()[0] for p in procs]
    for p in procs:
        p.wait()
    assert sorted(results) == ["busy", "busy", "busy", "won"]


PROGRAM = textwrap.dedent("""
    import os, sys
    os.environ["MTLLM_LOCALLY_LEARN"] = "0"
    import litellm
    import mtllm_locally
    from mtllm_locally.serve.runtime import Runtime
    rt = mtllm_locally.use_runtime(Runtime(store_path={store!r}))
    mtllm_locally.register_provider()
    for i in range(15):
        inv = f"{{os.getpid()}}-{{i}}"
        litellm.completion(model="mtllm_locally/{model}", max_tokens=3,
                           messages=[{{"role": "user", "content": f"item {{i}}"}}],
                           metadata={{"jac_caller_name": "f", "jac_invocation_id": inv}})
        rt.finish_call(inv, accepted=True)
    print("done", flush=True)
""")


def test_concurrent_programs_share_one_store(tmp_path, tiny_model_path):
    path = tmp_path / "shared.sqlite3"
    procs = [subprocess.Popen([sys.executable, "-c", PROGRAM.format(store=str(path), model=tiny_model_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "done", err[-2000:]
    s = Store(path)
    calls = s.calls()
    assert len(calls) == 45 and all(c["n_turns"] == 1 and c["accepted"] == 1 for c in calls)
    assert len({c["invocation_id"] for c in calls}) == 45


def test_serving_yields_cores_to_a_running_training(tmp_path, tiny_model_path):
    """ggml's decode threads spin: an engine that keeps every core while a training holds
    one slowed our bench's calls 26x (p50 0.21 s -> 5.6 s). While a training runs, the
    engine decodes with the cores it leaves free; afterwards with all of them again."""
    cores = len(os.sched_getaffinity(0))
    with Runtime(store_path=tmp_path / "calls.sqlite3",
                 engine_config=EngineConfig(flash_attn=False, n_ctx=256, n_threads=2)) as rt:
        reg = Registry(rt.store())
        eng = rt.engines.get(tiny_model_path)
        v = reg.reserve(TASK, "base@x", config={"policy": {"threads": 1}})  # this (live) process trains
        rt.route(eng, TASK)
        eng.generate("hi", max_tokens=2)
        assert eng.threads == min(2, max(1, cores - 1))
        build_tiny_llama(tmp_path / "second.gguf")
        other = rt.engines.get(str(tmp_path / "second.gguf"))  # an engine made while it trains
        other.generate("hi", max_tokens=2)
        assert other.threads == eng.threads
        reg.finish(v.adapter_id, "failed")
        rt.route(eng, TASK)
        eng.generate("hi", max_tokens=2)
        other.generate("hi", max_tokens=2)
        assert eng.threads == 2 and other.threads == 2
    with pytest.raises(Exception):
        eng.set_threads(-1)
