"""How the learning loop behaves, per task (Jac function) and globally.

Sources, later wins: defaults below < jac.toml `[plugins.mtllm_locally]` (and
`[plugins.mtllm_locally.tasks.<function>]`) < environment (`MTLLM_LOCALLY_TEACHER`,
`MTLLM_LOCALLY_LEARN=0`) < `mtllm_locally.configure_learning(...)` in Python.
"""

from __future__ import annotations

import os
import threading
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError


@dataclass(frozen=True)
class TaskPolicy:
    learn: bool = True              # capture -> train -> gate -> promote, with no manual step
    # Which calls become training examples. "labelled": outputs someone vouched for (a teacher
    # answered, feedback confirmed or corrected). "accepted": also the served model's own
    # accepted outputs -- a model trained on its own greedy answers learns nothing new and
    # entrenches its mistakes, and a gate scored against them always prefers the old model.
    train_on: str = "labelled"
    min_new_examples: int = 64      # a first training needs some variety; the trainer repeats small sets
    min_interval_s: float = 30.0    # between two trainings of any task: training shares the CPU
    heldout_percent: int = 20       # by a hash of the input, so an input is held out forever
    min_heldout: int = 8            # below this the gate cannot tell a better model from noise
    margin: float = 0.05            # candidate must beat the deployed version by this (held-out score)
    auto_promote: bool = True
    threads: int = 1                # training's thread budget; the program keeps the other cores
    teacher: str | None = None      # any LiteLLM model name; answers while the student is not good enough
    teacher_until: float = 0.9      # the teacher answers until a deployed adapter scores this on held-out
    shadow: bool = True             # with a teacher answering, also run the student on the same input
    train: dict = field(default_factory=dict)  # TrainConfig overrides

    def __post_init__(self):
        if self.train_on not in ("labelled", "accepted"):
            raise InvalidRequestError(f"train_on must be 'labelled' or 'accepted', not {self.train_on!r}")
        if not 0 < self.heldout_percent < 100 or self.min_new_examples < 2 or self.threads < 0:
            raise InvalidRequestError(f"bad learning policy: {self}")


_KEYS = {f.name for f in fields(TaskPolicy)}
_lock = threading.Lock()
_global: dict[str, Any] = {}
_tasks: dict[str, dict[str, Any]] = {}
_loaded = False


def _check(kw: dict, where: str) -> dict:
    unknown = set(kw) - _KEYS
    if unknown:
        raise InvalidRequestError(f"unknown learning settings in {where}: {sorted(unknown)}; known: {sorted(_KEYS)}")
    return kw


def _find_jac_toml(start: Path) -> Path | None:
    for d in (start, *start.parents):
        if (d / "jac.toml").is_file():
            return d / "jac.toml"
    return None


def _load_sources() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    path = _find_jac_toml(Path.cwd())
    if path is not None:
        try:
            section = tomllib.loads(path.read_text()).get("plugins", {}).get("mtllm_locally", {})
        except tomllib.TOMLDecodeError as e:
            raise InvalidRequestError(f"{path}: {e}") from e
        tasks = section.pop("tasks", {}) if isinstance(section, dict) else {}
        _global.update(_check(dict(section), str(path)))
        for fn, kw in tasks.items():
            _tasks.setdefault(fn, {}).update(_check(dict(kw), f"{path} [tasks.{fn}]"))
    if os.environ.get("MTLLM_LOCALLY_TEACHER"):
        _global["teacher"] = os.environ["MTLLM_LOCALLY_TEACHER"]
    if os.environ.get("MTLLM_LOCALLY_LEARN") == "0":
        _global["learn"] = False


def configure(function: str | None = None, **settings) -> None:
    """Change the policy globally, or for one Jac function (`function="classify"`)."""
    with _lock:
        _load_sources()
        target = _global if function is None else _tasks.setdefault(function, {})
        target.update(_check(settings, "configure_learning()"))
        policy_for(function)  # validate now, not at the next call


def reset() -> None:
    """Forget every setting (tests, or a program that reconfigures from scratch)."""
    global _loaded
    _global.clear()
    _tasks.clear()
    _loaded = False


def policy_for(function: str | None) -> TaskPolicy:
    _load_sources()
    kw = dict(_global)
    if function is not None:
        kw.update(_tasks.get(function, {}))
        kw.update(_tasks.get(function.rsplit(".", 1)[-1], {}))
    return replace(TaskPolicy(), **kw)


def describe(function: str | None) -> dict:
    return asdict(policy_for(function))
