"""Private by construction: importing and serving opens no socket."""

import os
import subprocess
import sys
import textwrap


def test_import_and_generate_open_no_socket(tiny_model_path):
    code = textwrap.dedent(f"""
        import socket
        class NoNetwork(socket.socket):
            def __init__(self, *a, **k):
                raise AssertionError("socket opened")
        socket.socket = NoNetwork
        def refuse(*a, **k):
            raise AssertionError("network call")
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        import mtllm_locally
        with mtllm_locally.Engine({tiny_model_path!r}) as eng:
            out = eng.generate("hello", max_tokens=4, ignore_eos=True)
            assert out.completion_tokens == 4
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_no_socket_syscalls_under_strace_like_audit(tiny_model_path):
    # sys.addaudithook sees every socket created from Python, including by dependencies.
    code = textwrap.dedent(f"""
        import sys
        events = []
        def hook(event, args):
            if event.startswith("socket."):
                events.append(event)
        sys.addaudithook(hook)
        import mtllm_locally
        with mtllm_locally.Engine({tiny_model_path!r}) as eng:
            eng.generate("hello", max_tokens=2, ignore_eos=True)
        print(events)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_provider_capture_and_learning_loop_open_no_socket(tiny_model_path, tmp_path):
    """A captured call through LiteLLM, with routing and the loop's trigger thread, and the
    CLI reading the store: no socket (our provider sets LiteLLM's offline cost map itself)."""
    store = str(tmp_path / "calls.sqlite3")
    code = textwrap.dedent(f"""
        import sys
        events = []
        sys.addaudithook(lambda e, a: events.append(e) if e.startswith("socket.") else None)
        import mtllm_locally
        from mtllm_locally.serve.runtime import Runtime
        import litellm
        rt = mtllm_locally.use_runtime(Runtime(store_path={store!r}))
        mtllm_locally.register_provider()
        r = litellm.completion(model="mtllm_locally/{tiny_model_path}", max_tokens=3,
                               messages=[{{"role": "user", "content": "hi"}}],
                               metadata={{"jac_caller_name": "f", "jac_invocation_id": "i1"}})
        rt.finish_call("i1", accepted=True)
        from mtllm_locally.cli import main
        main(["--store", {store!r}, "--json", "status"])
        print(events)
    """)
    env = {k: v for k, v in os.environ.items() if k != "LITELLM_LOCAL_MODEL_COST_MAP"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
