"""The runtime's engines: one per model, created on first use and shared by every
call and thread (so concurrent calls land in the same decode batches)."""

from __future__ import annotations

import os
import threading

from ..engine import Engine, EngineConfig
from ..errors import EngineClosedError
from ..models import DEFAULT_ALIASES


def model_key(name: str) -> str:
    """`default`-style aliases as they are; a path by its real location (two spellings, one engine)."""
    name = name.strip()
    if name in DEFAULT_ALIASES or name.endswith("-q4_1"):
        return name
    return os.path.realpath(os.path.expanduser(name))


class EnginePool:
    def __init__(self, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self._lock = threading.Lock()
        self._engines: dict[str, Engine] = {}
        self._threads = 0  # 0: each engine decodes with its configured thread count
        self._closed = False

    def get(self, name: str) -> Engine:
        key = model_key(name)
        with self._lock:
            if self._closed:
                raise EngineClosedError("the runtime was closed")
            eng = self._engines.get(key)
            if eng is None or eng.closed:
                eng = Engine(None if key in DEFAULT_ALIASES else key, self.config)
                if self._threads:
                    eng.set_threads(self._threads)
                self._engines[key] = eng
            return eng

    def share_cores(self, threads: int) -> None:
        """Decode with `threads` cores (0: as configured) from now on, in every engine."""
        with self._lock:
            self._threads = threads
            engines = [e for e in self._engines.values() if not e.closed]
        for eng in engines:
            try:
                eng.set_threads(threads)
            except Exception:  # closed meanwhile
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            engines = list(self._engines.values())
            self._engines.clear()
        for eng in engines:
            eng.close()
