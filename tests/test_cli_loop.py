"""The learning loop by hand: `mtllm-locally status | calls | feedback | train | eval |
promote | rollback | export | plot` on one store."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from loop_helpers import fill_store  # noqa: E402
from mtllm_locally.state.store import Store  # noqa: E402


def cli(store, *args, model=None):
    cmd = [sys.executable, "-m", "mtllm_locally", "--store", str(store), "--json"]
    if model:
        cmd += ["--model", model]
    env = dict(os.environ, MTLLM_LOCALLY_LEARN="1")
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=600, env=env)


def test_cli_drives_the_loop(tmp_path, tiny_model_path):
    path = tmp_path / "calls.sqlite3"
    s = Store(path)
    fill_store(s, 40)
    s.close()
    (tmp_path / "jac.toml").write_text("[plugins.mtllm_locally]\nmin_heldout = 1\nmargin = -1.0\n"
                                       "[plugins.mtllm_locally.train]\nepochs = 1\nbf16 = false\n")

    r = cli(path, "status")
    assert r.returncode == 0, r.stderr
    (task,) = json.loads(r.stdout)
    assert task["function"] == "classify" and task["calls"] == 40 and task["teacher_answers"] == 40
    assert task["train_examples"] + task["heldout_examples"] == 40 and task["deployed"] == "base"
    # what serves it, and what the trigger waits for, in words
    assert task["stage"] == "base model" and "trying 8 of them as demonstrations" in task["next"]

    r = cli(path, "feedback", "inv-classify:t-3", "--output", "2")
    assert r.returncode == 0, r.stderr
    assert cli(path, "feedback", "no-such-call", "--wrong").returncode == 2

    r = subprocess.run([sys.executable, "-m", "mtllm_locally", "--store", str(path), "--model", tiny_model_path,
                        "--json", "train", "classify", "--wait"], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    verdict = json.loads(r.stdout[r.stdout.index("{"):])
    assert verdict["adapter_id"] == "classify:t@v1" and verdict["status"] == "passed"  # margin -1: always passes
    (task,) = json.loads(cli(path, "status").stdout)
    assert "classify:t@v1" in task["stage"] and "passed" in task["last_eval"]

    r = cli(path, "calls", "--task", "classify", "--limit", "5")
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 5

    r = cli(path, "eval", "classify", model=tiny_model_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["version"] for x in rows] == ["base", "classify:t@v1"] and all(0 <= x["score"] <= 1 for x in rows)

    assert cli(path, "rollback", "classify", model=tiny_model_path).returncode == 0
    assert cli(path, "rollback", "classify", model=tiny_model_path).returncode == 2  # base already serves it
    assert cli(path, "promote", "classify:t@v1").returncode == 0
    assert cli(path, "promote", "classify:t@v9").returncode == 2

    out = tmp_path / "exported"
    assert cli(path, "export", "classify:t@v1", "--format", "peft", "--out", str(out)).returncode == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert cli(path, "export", "classify:t@v1", "--format", "gguf", "--out", str(tmp_path / "a.gguf")).returncode == 0
    assert (tmp_path / "a.gguf").read_bytes()[:4] == b"GGUF"

    png = tmp_path / "versions.png"
    r = cli(path, "plot", "--out", str(png))
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
