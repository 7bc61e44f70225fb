"""No outbound connection whatever the import order: a program that imports litellm before
mtllm_locally must not make LiteLLM fetch its cost map. The wheel installs
mtllm_locally-offline.pth into site-packages, which sets LITELLM_LOCAL_MODEL_COST_MAP at
interpreter start. Each check runs in a child process with no LITELLM_* variables (the
suite's conftest sets one itself), sockets patched before anything else runs."""

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PTH = "mtllm_locally-offline.pth"
SOURCE_PTH_DIR = Path(__file__).resolve().parents[1] / "python"

CHILD = textwrap.dedent("""
    import json, socket, sys
    attempts = []
    # Record every attempt to reach the network (audit events see C-level calls too), and refuse it.
    sys.addaudithook(lambda e, a: attempts.append([e, repr(a)[:200]]) if e in (
        "socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
        "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg") else None)
    def refuse(*a, **k):
        attempts.append(["call", repr(a)[:200]])
        raise OSError("network disabled by the test")
    socket.socket.connect = socket.socket.connect_ex = refuse
    socket.getaddrinfo = socket.create_connection = socket.gethostbyname = refuse
    sitedir = sys.argv[1]
    if sitedir:  # development: the source tree's .pth, processed as site.py would at start-up
        import site
        site.addsitedir(sitedir)
    import litellm                                   # first, as a program might
    import mtllm_locally
    mtllm_locally.register_provider()
    model = sys.argv[2]
    if model:
        r = litellm.completion(model="mtllm_locally/" + model, max_tokens=2,
                               messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message is not None
    print(json.dumps(attempts))
""")


def _clean_env(tmp_path, *, keep_pythonpath: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LITELLM")}
    env.update(MTLLM_LOCALLY_STORE=str(tmp_path / "calls.sqlite3"), MTLLM_LOCALLY_LEARN="0")
    if not keep_pythonpath:
        env.pop("PYTHONPATH", None)
    return env


def _attempts(env, sitedir: str = "", model: str = "") -> list:
    proc = subprocess.run([sys.executable, "-c", CHILD, sitedir, model], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_pth_file_keeps_litellm_offline_when_imported_first(tmp_path):
    """The .pth as written in the source tree, processed before `import litellm`."""
    assert (SOURCE_PTH_DIR / PTH).is_file()
    env = _clean_env(tmp_path, keep_pythonpath=True)
    assert _attempts(env, str(SOURCE_PTH_DIR)) == []


def test_the_check_sees_a_fetch():
    """The child does detect LiteLLM's fetch: with the variable explicitly off (which the
    .pth respects), importing litellm tries to connect."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LITELLM")}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "False"
    assert _attempts(env, str(SOURCE_PTH_DIR)) != []


def _installed_pth() -> Path | None:
    """The .pth of the installed (non-editable) mtllm_locally distribution, or None if that is not installed."""
    try:
        dist = importlib.metadata.distribution("mtllm_locally")
    except importlib.metadata.PackageNotFoundError:
        return None
    files = dist.files or []
    if not any(str(f).startswith("mtllm_locally/") for f in files):
        return None  # an editable install: no package files of its own
    return next((Path(dist.locate_file(f)) for f in files if str(f) == PTH), Path("missing"))


def test_installed_wheel_keeps_litellm_offline_in_any_import_order(tmp_path, tiny_model_path):
    """Against the installed package (`.venv`), as a user's program runs: no sitedir tricks, no
    PYTHONPATH, litellm imported first, then a completion through our provider."""
    pth = _installed_pth()
    if pth is None:
        pytest.skip("mtllm_locally is not installed as a wheel in this interpreter")
    assert pth.is_file(), f"the installed mtllm_locally has no {PTH} in site-packages: reinstall the package"
    env = _clean_env(tmp_path, keep_pythonpath=False)
    assert _attempts(env, "", tiny_model_path) == []
