"""One engine per model per process, created on first use and shared by every call
and thread (so concurrent calls land in the same decode batches)."""

from __future__ import annotations

import os
import threading

from ..engine import Engine, EngineConfig
from ..models import DEFAULT_ALIASES

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_config = EngineConfig()


def configure(config: EngineConfig) -> None:
    """Settings for engines created from now on (e.g. n_ctx, n_threads)."""
    global _config
    _config = config


def model_key(name: str) -> str:
    name = name.strip()
    if name in DEFAULT_ALIASES or name.endswith("-q4_1"):
        return name
    return os.path.realpath(os.path.expanduser(name))


def shared_engine(name: str) -> Engine:
    key = model_key(name)
    with _lock:
        eng = _engines.get(key)
        if eng is None or eng.closed:
            eng = Engine(None if key in DEFAULT_ALIASES else key, _config)
            _engines[key] = eng
        return eng


def close_all() -> None:
    with _lock:
        for eng in _engines.values():
            eng.close()
        _engines.clear()
