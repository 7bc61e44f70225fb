"""A runtime of the test's own, made the process's runtime (so LiteLLM's
`mtllm_locally/<model>` calls reach it), closed at the end."""

import contextlib

from mtllm_locally import wiring
from mtllm_locally.serve.runtime import Runtime


@contextlib.contextmanager
def own_runtime(store_path, *, learning: bool = True, **kw):
    rt = Runtime(store_path=store_path, **kw)
    wiring.use_runtime(rt, learning=learning)
    wiring.register_provider()
    try:
        yield rt
    finally:
        wiring.use_runtime(None)
