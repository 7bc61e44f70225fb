"""What a running case may use: the child's shared engine, a scratch directory,
fresh engines that are closed after the case, and one way to drive a request.

`drive` sends a request through one of the five public entry points (generate,
submit + result, stream, agenerate, astream), which the case picks with its rng, so
every input reaches the engine along every path a program could take.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import threading
from pathlib import Path

DRIVES = ("generate", "submit", "stream", "agenerate", "astream")
SMALL_ENGINE = {"n_ctx": 512, "n_batch": 128, "max_running": 8, "cache_sequences": 4, "n_threads": 1}


class Context:
    def __init__(self, workdir: str | os.PathLike, tiny_path: str, lora_path: str):
        self.workdir = Path(workdir)
        self.tiny_path = tiny_path   # the valid tiny model (the shared engine's)
        self.lora_path = lora_path   # a valid adapter for it
        self.engine = None
        self._extra: list = []
        self._files: list[Path] = []
        self._n = itertools.count()

    # ---- the shared engine (one per child; checked after every case)
    def shared_engine(self):
        if self.engine is None:
            from .. import Engine

            self.engine = Engine(self.tiny_path, **SMALL_ENGINE)
        return self.engine

    def replace_shared_engine(self) -> None:
        old, self.engine = self.engine, None
        if old is not None:
            _close_in_background(old)

    # ---- per-case resources
    def path(self, suffix: str = ".gguf") -> str:
        p = self.workdir / f"case{os.getpid()}_{next(self._n)}{suffix}"
        self._files.append(p)
        return str(p)

    def new_engine(self, model=None, **config):
        from .. import Engine

        cfg = dict(SMALL_ENGINE)
        cfg.update(config)
        eng = Engine(self.tiny_path if model is None else model, **cfg)
        self._extra.append(eng)
        return eng

    def end_case(self) -> None:
        for eng in self._extra:
            _close_in_background(eng)
        self._extra.clear()
        for p in self._files:
            try:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            except OSError:
                pass
        self._files.clear()


def _close_in_background(eng, wait: float = 10.0) -> None:
    """Close an engine, but never let a wedged one wedge the fuzzer too (a close that
    does not return shows up in the engine-still-serving check instead)."""
    t = threading.Thread(target=eng.close, daemon=True)
    t.start()
    t.join(wait)


def drive(engine, how: str, prompt=None, **kw) -> None:
    """Run one request through the entry point `how` (one of DRIVES)."""
    if how == "generate":
        engine.generate(prompt, **kw)
    elif how == "submit":
        engine.submit(prompt, **kw).result()
    elif how == "stream":
        for _ in engine.stream(prompt, **kw):
            pass
    elif how == "agenerate":
        asyncio.run(engine.agenerate(prompt, **kw))
    else:
        async def consume():
            async for _ in engine.astream(prompt, **kw):
                pass

        asyncio.run(consume())


HELLO = [{"role": "user", "content": "Say hello."}]
