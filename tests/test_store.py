"""The call store: durable, private, versioned, shared between processes."""

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap

import pytest

from mtllm_locally.serve.runtime import Runtime
from mtllm_locally.state.store import MIGRATIONS, SCHEMA_VERSION, Store, StoreError


def turn(store, inv, text="x", fn="f"):
    store.record_turn(invocation_id=inv, task_key=f"{fn}:abc", function=fn, model="m", messages=[{"role": "user", "content": "q"}],
                      output_text=text, finish_reason="stop", latency_ms=1.0, prompt_tokens=3, completion_tokens=2)


def test_wal_private_and_versioned(tmp_path):
    s = Store(tmp_path / "calls.sqlite3")
    assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s.schema_version() == SCHEMA_VERSION
    turn(s, "a")
    for suffix in ("", "-wal"):
        p = tmp_path / f"calls.sqlite3{suffix}"
        if p.exists():
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600


def test_turns_accumulate_and_byllm_verdict_marks_retries(tmp_path):
    s = Store(tmp_path / "c.sqlite3")
    turn(s, "inv", "not json")
    turn(s, "inv", '{"ok": 1}')
    s.finish_call("inv", accepted=True, inputs={"text": "hi"}, function="mod.f")
    (call,) = s.calls()
    assert call["n_turns"] == 2 and call["accepted"] == 1 and call["output_text"] == '{"ok": 1}'
    assert call["prompt_tokens"] == 6 and call["inputs_json"] == '{"text": "hi"}'
    assert [t["accepted"] for t in s.turns("inv")] == [0, 1]


def test_a_shadow_answer_fills_its_own_turn_once(tmp_path):
    s = Store(tmp_path / "s.sqlite3")
    assert [s.record_turn(invocation_id="inv", task_key="f:abc", function="f", model="m", messages=[],
                          output_text=t, finish_reason="stop", latency_ms=1.0, prompt_tokens=1, completion_tokens=1)
            for t in ("a", "b")] == [0, 1]  # the turn's index within its call
    assert s.set_shadow_output("inv", 1, "student")
    assert not s.set_shadow_output("inv", 1, "again")  # never overwritten
    assert not s.set_shadow_output("inv", 7, "student") and not s.set_shadow_output("other", 0, "student")
    assert [t["shadow_output"] for t in s.turns("inv")] == [None, "student"]


def test_feedback(tmp_path):
    s = Store(tmp_path / "c.sqlite3")
    turn(s, "inv")
    s.add_feedback("inv", correct=False, corrected_output={"label": 2})
    s.add_feedback("inv", score=0.5)
    fb = s.feedback("inv")
    assert fb[0]["correct"] == 0 and fb[0]["corrected_output"] == '{"label": 2}' and fb[1]["score"] == 0.5
    with pytest.raises(KeyError):
        s.add_feedback("missing", correct=True)
    with pytest.raises(ValueError):
        s.add_feedback("inv")


def test_reopen_keeps_data_and_newer_schema_is_refused(tmp_path):
    p = tmp_path / "c.sqlite3"
    s = Store(p)
    turn(s, "inv")
    s.close()
    assert len(Store(p).calls()) == 1
    db = sqlite3.connect(p)
    db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer"):
        Store(p)
    db = sqlite3.connect(p)
    assert db.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == 1  # nothing lost


def test_corrupt_file_is_a_clear_error(tmp_path):
    p = tmp_path / "c.sqlite3"
    p.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        Store(p)


def test_two_processes_share_one_store(tmp_path):
    p = tmp_path / "c.sqlite3"
    Store(p).close()
    code = textwrap.dedent(f"""
        import sys
        from mtllm_locally.state.store import Store
        s = Store({str(p)!r})
        for i in range(100):
            s.record_turn(invocation_id=f"{{sys.argv[1]}}-{{i}}", task_key="t:1", function="t", model="m",
                          messages=[], output_text="o", finish_reason="stop", latency_ms=1, prompt_tokens=1,
                          completion_tokens=1)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, name]) for name in ("a", "b")]
    assert all(pr.wait(120) == 0 for pr in procs)
    assert len(Store(p).calls(limit=10000)) == 200


def test_broken_store_never_breaks_a_call(tmp_path, caplog):
    bad = tmp_path / "dir-not-file"
    bad.mkdir()
    heard = []
    with Runtime(store_path=bad) as rt:
        rt.on_call(heard.append)
        inv = rt.record_turn(invocation_id="i", task_key="t", function="t", model="m", model_path=None, messages=[],
                             response_format=None, tools=None, output_text="x", tool_calls=None, finish_reason="stop",
                             latency_ms=1, prompt_tokens=1, completion_tokens=1, cached_tokens=0, temperature=0.0)
        assert inv is None and heard == []  # nothing stored, nothing announced, no exception
        assert "call capture failed" in caplog.text
        assert rt.route(object(), "t").adapter_id is None  # a broken store routes to the base model


def test_v1_store_is_migrated_forward_without_loss(tmp_path):
    import sqlite3

    p = tmp_path / "old.sqlite3"
    db = sqlite3.connect(p)
    db.executescript(MIGRATIONS[0])
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO calls (invocation_id, task_key, created_at, output_text, accepted) "
               "VALUES ('old', 'f:1', 1.0, 'kept', 1)")
    db.commit()
    db.close()
    s = Store(p)
    assert s.schema_version() == SCHEMA_VERSION >= 2
    (row,) = s.calls()
    assert row["output_text"] == "kept" and row["source"] is None
    assert s.rows("SELECT COUNT(*) AS n FROM adapters")[0]["n"] == 0
