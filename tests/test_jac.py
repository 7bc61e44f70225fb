"""Real Jac programs, unchanged, through `jac run` on the default model — with
every socket blocked, to prove nothing reaches the network."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mtllm_locally.bench.offline import offline_pythonpath
from mtllm_locally.state.store import Store

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
JAC = Path(sys.executable).with_name("jac")

def jac_run(program: Path, workdir: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=offline_pythonpath(workdir), **(env_extra or {}))  # sockets refused
    env.pop("LITELLM_LOCAL_MODEL_COST_MAP", None)  # our provider must set it itself
    shutil.copy(program, workdir / program.name)
    return subprocess.run([str(JAC), "run", program.name], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("jac")
    proc = jac_run(EXAMPLES / "classify.jac", work)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, Store(work / ".mtllm_locally" / "calls.sqlite3")


def test_typed_results_parse(classify_run):
    proc, _ = classify_run
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("Sentiment.")
    name, age = lines[1].rsplit(" ", 1)
    assert name and int(age) >= 0
    assert lines[2].startswith("[") and lines[2].endswith("]")


def test_every_call_is_in_the_store(classify_run):
    _, store = classify_run
    calls = {c["function"]: c for c in store.calls()}
    assert set(calls) == {"classify", "extract_person", "list_fruits"}
    for fn, c in calls.items():
        assert c["accepted"] == 1 and c["error"] is None
        assert c["task_key"].startswith(fn + ":")
        assert c["model"] == "mtllm_locally/default" and c["temperature"] == 0.0
        assert c["prompt_tokens"] > 0 and c["completion_tokens"] > 0 and c["latency_ms"] > 0
        (turn,) = store.turns(c["invocation_id"])
        assert json.loads(turn["response_format_json"])["type"] == "json_schema"
        json.loads(turn["output_text"])  # the raw output is valid JSON
    assert json.loads(calls["extract_person"]["inputs_json"]) == {"text": "Bob is 42 years old and lives in Paris."}


def test_method_and_react_tools(tmp_path):
    proc = jac_run(EXAMPLES / "method_and_tools.jac", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] in ("True", "False")
    assert lines[1]
    store = Store(tmp_path / ".mtllm_locally" / "calls.sqlite3")
    react = next(c for c in store.calls() if c["function"] == "warmest_city")
    turns = store.turns(react["invocation_id"])
    assert 2 <= len(turns) <= 9  # the loop guard ends it
    assert all(t["finish_reason"] == "tool_calls" for t in turns)
    assert json.loads(turns[-1]["tool_calls_json"])[0]["function"]["name"] == "finish_tool"
    assert react["accepted"] == 1


def test_jac_toml_default_model_and_feedback_from_jac(tmp_path):
    (tmp_path / "jac.toml").write_text('[plugins.byllm.model]\ndefault_model = "mtllm_locally/default"\n')
    prog = tmp_path / "src.jac"
    prog.write_text(textwrap.dedent("""
        import from mtllm_locally { feedback }
        enum Color { RED, GREEN, BLUE }
        def color_of(thing: str) -> Color by llm();
        with entry {
            c = color_of("a ripe tomato");
            print(c);
            print(feedback(correct=False, corrected_output="RED"));
        }
    """))
    work = tmp_path / "run"
    work.mkdir()
    shutil.copy(tmp_path / "jac.toml", work / "jac.toml")
    proc = jac_run(prog, work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    color, inv = proc.stdout.strip().splitlines()[-2:]
    assert color.startswith("Color.")
    store = Store(work / ".mtllm_locally" / "calls.sqlite3")
    (fb,) = store.feedback(inv)
    assert fb["correct"] == 0 and fb["corrected_output"] == "RED"


def test_broken_store_does_not_break_the_program(tmp_path):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the store's folder should be")
    proc = jac_run(EXAMPLES / "classify.jac", tmp_path, {"MTLLM_LOCALLY_STORE": str(blocked / "calls.sqlite3")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[0].startswith("Sentiment.")
    assert "call capture failed" in proc.stderr


def test_typed_shapes_that_ran_away_now_complete(tmp_path):
    """Issue 13's two shapes, written as for a cloud model, with networking cut: a list of
    objects and an object of free strings come back complete on the first model turn,
    within the budget the provider chose from the schema (byllm sends none)."""
    proc = jac_run(EXAMPLES / "ticket_and_invoice.jac", tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ticket, *invoices = proc.stdout.strip().splitlines()[-4:]
    customer, urgent, n_items, _ = ticket.split("|", 3)
    assert customer and urgent in ("True", "False") and int(n_items) >= 0
    assert len(invoices) == 3 and all(len(line.split("|")) == 3 for line in invoices)
    from mtllm_locally.serve.typed_calls import MAX_BUDGET

    store = Store(tmp_path / ".mtllm_locally" / "calls.sqlite3")
    calls = store.calls()
    assert len(calls) == 4
    for c in calls:
        (turn,) = store.turns(c["invocation_id"])  # no retry
        assert c["accepted"] == 1 and turn["attempt"] == 1
        json.loads(turn["output_text"])
        assert turn["completion_tokens"] <= MAX_BUDGET
        assert (turn["finish_reason"] == "length") == (turn["closed_by"] == "budget")


LOOPBACK_ONLY = """\
import socket
_connect, _create, _getaddrinfo = socket.socket.connect, socket.create_connection, socket.getaddrinfo
def _loopback(host):
    if host not in ("127.0.0.1",):
        raise OSError(f"network blocked by the test's guard: {host}")
socket.socket.connect = lambda self, addr, *a: (_loopback(addr[0]) if isinstance(addr, tuple) else None, _connect(self, addr, *a))[1]
socket.create_connection = lambda addr, *a, **k: (_loopback(addr[0]), _create(addr, *a, **k))[1]
socket.getaddrinfo = lambda host, *a, **k: (_loopback(host), _getaddrinfo(host, *a, **k))[1]
"""


def test_the_same_program_is_served_by_vllm_by_configuration_only(tmp_path):
    """jac.toml names a vLLM server: the unchanged program's calls go there (through LiteLLM's
    hosted_vllm route), are captured as before, and feedback works; nothing else is reached."""
    from vllm_fake import FakeVLLM

    prog = tmp_path / "src.jac"
    prog.write_text(textwrap.dedent("""
        import from mtllm_locally { feedback }
        enum Color { RED, GREEN, BLUE }
        def color_of(thing: str) -> Color by llm();
        with entry {
            print(color_of("a ripe tomato"));
            print(feedback(correct=True));
        }
    """))
    byllm_model = '[plugins.byllm.model]\ndefault_model = "mtllm_locally/default"\n'
    local = tmp_path / "local"
    local.mkdir()
    (local / "jac.toml").write_text(byllm_model)
    proc = jac_run(prog, local)
    assert proc.returncode == 0, proc.stderr[-3000:]
    local_out = proc.stdout.splitlines()[0]
    (call,) = Store(local / ".mtllm_locally" / "calls.sqlite3").calls()
    answer = Store(local / ".mtllm_locally" / "calls.sqlite3").turns(call["invocation_id"])[0]["output_text"]

    with FakeVLLM(base="smollm2-f32", answer=lambda model, body: answer) as fake:
        remote = tmp_path / "remote"
        remote.mkdir()
        (remote / "jac.toml").write_text(byllm_model + f'[plugins.mtllm_locally.vllm]\nbase_url = "{fake.url}/v1"\n'
                                         f'served_base = "smollm2-f32"\n')
        guard = remote / "_loopback"
        guard.mkdir()
        (guard / "sitecustomize.py").write_text(LOOPBACK_ONLY)
        shutil.copy(prog, remote / prog.name)
        env = dict(os.environ, PYTHONPATH=str(guard), NO_PROXY="127.0.0.1")
        env.pop("LITELLM_LOCAL_MODEL_COST_MAP", None)
        proc = subprocess.run([str(JAC), "run", prog.name], cwd=remote, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.splitlines()[0] == local_out  # the server's answer (the same text) parsed as before
        (chat,) = fake.chats("smollm2-f32")
        assert chat["temperature"] == 0.0 and chat["response_format"]["type"] == "json_schema"
        assert chat["messages"][-1]["content"] and "tomato" in json.dumps(chat["messages"])
    store = Store(remote / ".mtllm_locally" / "calls.sqlite3")
    (call,) = store.calls()
    (turn,) = store.turns(call["invocation_id"])
    assert (turn["model"], turn["source"], turn["output_text"]) == ("hosted_vllm/smollm2-f32", "model", answer)
    assert call["accepted"] == 1 and store.feedback(call["invocation_id"])[0]["correct"] == 1
    assert local_out.startswith("Color.")
