"""The store's files: task names become safe, distinct directories; a stuck training
reservation is always recovered; everything under the store is its owner's only."""

import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loop_helpers import fill_store
from mtllm_locally.state.policy import Policy, TaskPolicy
from mtllm_locally.state.registry import Registry, RegistryError
from mtllm_locally.state.store import MIGRATIONS, Store
from mtllm_locally.state.task import task_dirname

HOSTILE = ["..", ".", "a/b:h", "a-b:h", "../../x", "../../x:h", "/etc/passwd:h", "A/b:h", "a/B:h",
           "Classify:t", "classify:t", "classify!:t", "classify?:t", "clas sify:t", "x" * 300 + ":h",
           "", ":", "ünïcode/ƒn:h", "a\\b:h", "a\x00b:h", "mod.Class.method:1", "-:h", "...:h"]


def modes_under(root: Path) -> list[tuple[str, str]]:
    """(path, octal mode) of everything under root that is not 0700 (dir) / 0600 (file)."""
    bad = []
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                continue
            want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
            if stat.S_IMODE(st.st_mode) != want:
                bad.append((os.path.relpath(p, root), oct(stat.S_IMODE(st.st_mode))))
    return bad


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def fake_version(reg: Registry, task_key: str, payload: str, base: str = "base@x"):
    """A complete version without training: reserve, stage, publish, finish."""
    v = reg.reserve(task_key, base, config={"policy": {}, "model_path": ""})
    staging = reg.staging_dir(v)
    (staging / "adapter.gguf").write_text(payload)
    (staging / "peft").mkdir()
    (staging / "peft" / "adapter_config.json").write_text(json.dumps({"task": payload}))
    v = reg.publish(v, staging, data={"n_train": 0}, metrics={})
    reg.finish(v.adapter_id, "passed", metrics={"candidate_score": 0.5})
    return reg.get(v.adapter_id)


# ---------------------------------------------------------------------------------- task directories

def test_task_dirnames_are_safe_bounded_and_distinct(tmp_path):
    names = [task_dirname(k) for k in HOSTILE]
    for k, n in zip(HOSTILE, names):
        assert re.fullmatch(r"[a-z0-9_-]{1,64}", n), (k, n)
        assert n not in (".", "..") and os.sep not in n and "\\" not in n
        assert (tmp_path / n).resolve().parent == tmp_path.resolve(), (k, n)
    # distinct even on a case-insensitive file system, and stable
    assert len({n.lower() for n in names}) == len(HOSTILE)
    assert names == [task_dirname(k) for k in HOSTILE]
    assert task_dirname("classify:abc123").startswith("classify-")  # still readable


def test_publishing_one_task_never_touches_another(tmp_path):
    st = Store(tmp_path / "calls.sqlite3")
    reg = Registry(st)
    versions = {k: fake_version(reg, k, payload=f"adapter of {k!r}") for k in HOSTILE}
    for k in HOSTILE[:4]:  # and a second version of some
        versions[k + "#2"] = fake_version(reg, k, payload=f"adapter of {k!r} v2")
    root = reg.root.resolve()
    dirs = {Path(v.path).resolve() for v in versions.values()}
    assert len(dirs) == len(versions), "two versions share a directory"
    for k, v in versions.items():
        p = Path(v.path).resolve()
        assert p.parent.parent == root, f"{k!r} escaped adapters/: {p}"
        assert v.gguf_path.read_text() == f"adapter of {k.removesuffix('#2')!r}" + (" v2" if k.endswith("#2") else "")
        assert json.loads((p / "manifest.json").read_text())["adapter_id"] == v.adapter_id
        assert reg.promote(v.adapter_id)
    # nothing was written outside adapters/ besides the database
    assert sorted(x.name for x in tmp_path.iterdir() if not x.name.startswith("calls.sqlite3")) == ["adapters"]


def test_publish_refuses_to_replace_another_versions_directory(tmp_path):
    st = Store(tmp_path / "calls.sqlite3")
    reg = Registry(st)
    a = fake_version(reg, "a:1", "A")
    v = reg.reserve("b:1", "base@x")
    with st.transaction() as db:  # as if two keys had mapped to one directory (the old layout)
        db.execute("UPDATE adapters SET path=? WHERE adapter_id=?", (a.path, v.adapter_id))
    staging = reg.staging_dir(reg.get(v.adapter_id))
    (staging / "adapter.gguf").write_text("B")
    with pytest.raises(RegistryError, match="belongs to"):
        reg.publish(reg.get(v.adapter_id), staging, data={}, metrics={})
    assert a.gguf_path.read_text() == "A"
    assert reg.finish(v.adapter_id, "failed") and reg.training() is None


def _v2_store(path: Path) -> sqlite3.Connection:
    """A store as the previous version left it: schema v2, the old directory layout."""
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    for stmt in MIGRATIONS[1].split(";"):
        if stmt.strip():
            db.execute(stmt)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    db.commit()
    return db


def test_old_layout_store_keeps_working_and_is_tightened(tmp_path, umask022):
    root = tmp_path / "proj" / ".mtllm_locally"
    old = root / "adapters" / "classify-t" / "v1"
    (old / "peft").mkdir(parents=True)
    (old / "adapter.gguf").write_text("old v1")
    (old / "manifest.json").write_text(json.dumps({"adapter_id": "classify:t@v1"}))
    (root / "logs").mkdir()
    (root / "logs" / "train-classify-t-v1.log").write_text("prompts in here")
    os.chmod(root, 0o755)
    db = _v2_store(root / "calls.sqlite3")
    db.execute("INSERT INTO adapters (adapter_id, task_key, version, base, status, created_at, pid, path) "
               "VALUES ('classify:t@v1', 'classify:t', 1, 'base@x', 'passed', 1.0, 1, ?)", (str(old),))
    db.execute("INSERT INTO deployments VALUES ('classify:t', 'base@x', 'classify:t@v1', 1.0)")
    # the old code's stuck reservation: a `/` in the function name, reserved by a process now gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    db.execute("INSERT INTO adapters (adapter_id, task_key, version, base, status, created_at, pid, path) "
               "VALUES ('ns/f:1@v1', 'ns/f:1', 1, 'base@x', 'training', ?, ?, ?)",
               (time.time(), dead.pid, str(root / "adapters" / "ns-f-1" / "v1")))
    db.commit()
    db.close()
    os.chmod(root / "calls.sqlite3", 0o644)

    st = Store(root / "calls.sqlite3")
    assert modes_under(root) == [] and stat.S_IMODE(os.stat(root).st_mode) == 0o700
    reg = Registry(st)
    assert reg.training() is None and reg.get("ns/f:1@v1").status == "failed"
    assert reg.deployed("classify:t", "base@x").gguf_path.read_text() == "old v1"  # old rows keep their paths
    v2 = fake_version(reg, "classify:t", "new v2")
    assert v2.version == 2 and Path(v2.path).parent.name == task_dirname("classify:t") != "classify-t"
    assert reg.get("classify:t@v1").gguf_path.read_text() == "old v1"
    assert reg.promote("classify:t@v2") and reg.rollback("classify:t", "base@x") == "classify:t@v1"
    assert modes_under(root) == []


# ---------------------------------------------------------------------------------- reservations

RESERVE_AND_DIE = textwrap.dedent("""
    import os, sys
    from mtllm_locally.state.store import Store
    from mtllm_locally.state.registry import Registry
    v = Registry(Store(sys.argv[1])).reserve(sys.argv[2], "base@x", config={"policy": {}, "model_path": ""})
    print(v.adapter_id, flush=True)
    os._exit(0)  # no finish, no cleanup: as a process killed mid-training
""")


def test_reservation_of_a_dead_process_is_reclaimed(tmp_path):
    st = Store(tmp_path / "calls.sqlite3")
    out = subprocess.run([sys.executable, "-c", RESERVE_AND_DIE, str(st.path), "f:1"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    left = out.stdout.strip()
    reg = Registry(st)
    assert reg.get(left).status == "training" and reg.get(left).owner_host
    v = reg.reserve("g:1", "base@x")  # another task may train now
    assert reg.get(left).status == "failed" and "ended without finishing" in reg.get(left).error
    assert v.status == "training"


def test_reservation_of_a_reused_pid_is_reclaimed(tmp_path):
    st = Store(tmp_path / "calls.sqlite3")
    reg = Registry(st)
    v = reg.reserve("f:1", "base@x")  # held by this (live) process
    with pytest.raises(RegistryError, match="already running"):
        reg.reserve("g:1", "base@x")
    if v.owner_start is None:
        pytest.skip("no /proc: process identity beyond the pid is unknown here")
    with st.transaction() as db:  # the pid now belongs to another process than the one that reserved
        db.execute("UPDATE adapters SET owner_start=? WHERE adapter_id=?", (v.owner_start + "0", v.adapter_id))
    assert reg.training() is None and reg.get(v.adapter_id).status == "failed"


def test_silent_reservation_is_reclaimed_after_the_timeout(tmp_path):
    st = Store(tmp_path / "calls.sqlite3")
    reg = Registry(st)
    v = reg.reserve("f:1", "base@x")  # owner alive (this process) but never heard from again
    assert reg.heartbeat(v.adapter_id) and reg.reap() == []
    with st.transaction() as db:
        db.execute("UPDATE adapters SET heartbeat_at=? WHERE adapter_id=?", (time.time() - 3600, v.adapter_id))
    assert reg.training() is None
    got = reg.get(v.adapter_id)
    assert got.status == "failed" and "not heard from" in got.error
    # the owner learns it lost the reservation, and its late outcome changes nothing
    assert not reg.heartbeat(v.adapter_id) and not reg.finish(v.adapter_id, "passed")
    assert reg.get(v.adapter_id).status == "failed"
    assert reg.reserve("f:1", "base@x").version == 2


def test_release_by_hand(tmp_path, capsys):
    from mtllm_locally.cli import main

    st = Store(tmp_path / "calls.sqlite3")
    reg = Registry(st)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        v = reg.reserve("f:1", "base@x", pid=holder.pid)
        assert main(["--store", str(st.path), "release"]) == 2  # alive: refused without --force
        assert "--force" in capsys.readouterr().err and reg.get(v.adapter_id).status == "training"
        assert main(["--store", str(st.path), "release", "--force"]) == 0
        assert holder.wait(timeout=30) == -signal.SIGTERM  # its process was asked to stop
        assert reg.get(v.adapter_id).status == "failed" and reg.training() is None
        assert main(["--store", str(st.path), "release", v.adapter_id]) == 2  # nothing left to release
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_failure_between_reserving_and_starting_releases_the_reservation(tmp_path, tiny_model_path, monkeypatch):
    from mtllm_locally.learn import trigger

    st = Store(tmp_path / "calls.sqlite3")
    fill_store(st, 12, "f:1")

    def refuse(*a, **kw):
        raise OSError("no processes left")

    monkeypatch.setattr(trigger.subprocess, "Popen", refuse)
    with pytest.raises(OSError):
        trigger.start_training(st, trigger.TaskRef("f:1", "f", tiny_model_path), TaskPolicy())
    reg = Registry(st)
    (v,) = reg.versions("f:1")
    assert v.status == "failed" and "no processes left" in v.error and reg.training() is None


# ---------------------------------------------------------------------------------- end to end

SLASH_TASK = "ns/classify:t"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_path):
    """One real training, started with umask 022, of a task whose function name has a `/`,
    on a store in which a dead process left a reservation behind."""
    from mtllm_locally.learn.trigger import TaskRef, start_training

    old_umask = os.umask(0o022)
    policy = Policy()
    policy.configure(min_new_examples=10, min_interval_s=0, threads=1, min_heldout=1, margin=-1.0,
                     train={"epochs": 1, "bf16": False, "learning_rate": 1e-2})
    try:
        proj = tmp_path_factory.mktemp("proj")
        os.chmod(proj, 0o755)
        root = proj / ".mtllm_locally"
        st = Store(root / "calls.sqlite3")
        fill_store(st, 30, SLASH_TASK)
        with st.transaction() as db:
            db.execute("UPDATE calls SET function='ns/classify'")
        out = subprocess.run([sys.executable, "-c", RESERVE_AND_DIE, str(st.path), "other:1"], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        v, proc = start_training(st, TaskRef(SLASH_TASK, "ns/classify", tiny_model_path),
                                 policy.for_task("ns/classify"), wait=True)
        yield {"store": st, "root": root, "v": v, "proc": proc, "dead": out.stdout.strip()}
        st.close()
    finally:
        os.umask(old_umask)


def test_slash_in_function_name_trains_end_to_end(trained):
    reg = Registry(trained["store"])
    v = reg.get(trained["v"].adapter_id)
    log = (trained["root"] / "logs" / f"train-{task_dirname(SLASH_TASK)}-v1.log").read_text()
    assert trained["proc"].returncode == 0, log[-3000:]
    assert v.status in ("passed", "rejected"), (v.error, log[-3000:])
    assert v.gguf_path.is_file() and Path(v.path).parent == reg.root / task_dirname(SLASH_TASK)
    assert reg.training() is None and not [x for x in reg.versions() if x.status == "training"]
    nxt = reg.reserve(SLASH_TASK, v.base)  # nothing blocks the next training
    assert nxt.version == 2 and reg.finish(nxt.adapter_id, "cancelled")


def test_dead_reservation_did_not_block_the_training(trained):
    reg = Registry(trained["store"])
    assert reg.get(trained["dead"]).status == "failed"
    assert trained["v"].version == 1 and trained["proc"].returncode == 0


def test_everything_under_the_store_is_private(trained, tmp_path, umask022):
    root = trained["root"]
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    kinds = {p.name for p in root.rglob("*")}
    assert {"calls.sqlite3", "adapter.gguf", "data.jsonl", "manifest.json", "adapter_config.json"} <= kinds
    assert any(n.startswith("train-") and n.endswith(".log") for n in kinds)
    assert modes_under(root) == []

    # what the CLI copies out is as private as its source
    from mtllm_locally.cli import main

    adapter_id = trained["v"].adapter_id
    store = str(trained["store"].path)
    assert main(["--store", store, "export", adapter_id, "--format", "gguf", "--out", str(tmp_path / "a.gguf")]) == 0
    assert main(["--store", store, "export", adapter_id, "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert stat.S_IMODE(os.stat(tmp_path / "a.gguf").st_mode) == 0o600
    assert modes_under(tmp_path / "peft") == [] and stat.S_IMODE(os.stat(tmp_path / "peft").st_mode) == 0o700
    pytest.importorskip("matplotlib")
    assert main(["--store", store, "plot", "--out", str(tmp_path / "v.png")]) == 0
    assert stat.S_IMODE(os.stat(tmp_path / "v.png").st_mode) == 0o600
