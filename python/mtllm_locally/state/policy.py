"""How the learning loop behaves, per task (Jac function) and globally.

Sources, later wins: defaults below < jac.toml `[plugins.mtllm_locally]` (and
`[plugins.mtllm_locally.tasks.<function>]`) < environment (`MTLLM_LOCALLY_TEACHER`,
`MTLLM_LOCALLY_LEARN=0`, `MTLLM_LOCALLY_VLLM_URL`, `MTLLM_LOCALLY_VLLM=0`) <
`mtllm_locally.configure_learning(...)` in Python. The nested tables (`train`, `vllm`) merge
key by key: a task's `[...tasks.<function>.vllm]` changes only the keys it names.
Shared by both loops: serve reads the teacher and vLLM routing settings, learn the rest.
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
class VLLMSettings:
    """A vLLM server that serves the task's promoted versions (scale-out; README "Scaling out").
    Off until `base_url` is set. The API key is never stored: `api_key_env` names the variable."""
    base_url: str | None = None     # http(s)://host:port of the OpenAI-compatible server
    enabled: bool = True            # false: neither push nor route (a task opting out of the global table)
    route: bool = True              # false: promotions are pushed, calls stay in process
    served_base: str | None = None  # the model id vLLM serves the base under (`mtllm-locally export-hf`)
    model: str = "default"          # the local model (name or GGUF path) that base was exported from: calls
                                    #   and versions of any other model stay in process
    server_adapter_dir: str | None = None  # where the server sees <store>/adapters (vLLM loads by path)
    api_key_env: str | None = None  # the NAME of the environment variable holding the key
    gate: bool = True               # judge the pushed adapter on the server before traffic moves
    max_drop: float = 0.0           # the server's score may trail the local candidate's by this much
    drain_s: float = 60.0           # an old version stays loaded this long after traffic left it
    timeout_s: float = 60.0         # one call's limit on the server, then it is served in process
    required: bool = True           # server unreachable at promotion: do not promote (false: promote locally)

    def __post_init__(self):
        if self.max_drop < 0 or self.drain_s < 0 or self.timeout_s <= 0:
            raise InvalidRequestError(f"bad vllm settings: {self}")
        if self.base_url is not None:
            from .vllm_target import server_root
            server_root(self.base_url)  # refuses a malformed URL now, not at the first promotion

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.base_url)

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


_VLLM_KEYS = frozenset(f.name for f in fields(VLLMSettings))


@dataclass(frozen=True)
class TaskPolicy:
    learn: bool = True              # capture -> train -> gate -> promote, with no manual step
    # Which calls become training examples. "labelled": outputs someone vouched for (a teacher
    # answered, feedback confirmed or corrected). "accepted": also the served model's own
    # accepted outputs -- a model trained on its own greedy answers learns nothing new and
    # entrenches its mistakes, and a gate scored against them always prefers the old model.
    train_on: str = "labelled"
    # A training starts once this many new training examples (held-out ones not counted) came in
    # since the task's last training; a retraining also waits until the data has doubled.
    min_new_examples: int = 40
    demonstrations: int = 8         # shown in the prompt when the gate finds they help (0: never tried)
    warm_start: bool = True         # a retraining continues from the deployed adapter
    min_interval_s: float = 30.0    # between two trainings of any task: training shares the CPU
    heldout_percent: int = 20       # by a hash of the input, so an input is held out forever
    min_heldout: int = 8            # below this the gate cannot tell a better model from noise
    margin: float = 0.05            # candidate must beat the deployed version by this (held-out score)
    auto_promote: bool = True
    threads: int = 1                # training's threads while the program calls the model; all once it is idle
    teacher: str | None = None      # any LiteLLM model name; answers while the student is not good enough
    teacher_until: float = 0.9      # the teacher answers until a deployed adapter scores this on held-out
    shadow: bool = True             # with a teacher answering, also run the student on the same input
    train: dict = field(default_factory=dict)  # TrainConfig overrides
    vllm: dict = field(default_factory=dict)   # VLLMSettings (as a plain table: it is snapshotted as JSON)

    def __post_init__(self):
        unknown = set(self.vllm) - _VLLM_KEYS
        if unknown:
            raise InvalidRequestError(f"unknown vllm settings: {sorted(unknown)}; known: {sorted(_VLLM_KEYS)}")
        VLLMSettings(**self.vllm)
        if self.train_on not in ("labelled", "accepted"):
            raise InvalidRequestError(f"train_on must be 'labelled' or 'accepted', not {self.train_on!r}")
        if not 0 < self.heldout_percent < 100 or self.min_new_examples < 2 or self.threads < 0 \
                or self.demonstrations < 0:
            raise InvalidRequestError(f"bad learning policy: {self}")

    @property
    def remote(self) -> VLLMSettings:
        return VLLMSettings(**self.vllm)


_KEYS = frozenset(f.name for f in fields(TaskPolicy))
_NESTED = ("train", "vllm")  # tables merged key by key across global, task and configure()


def _check(kw: dict, where: str) -> dict:
    unknown = set(kw) - _KEYS
    if unknown:
        raise InvalidRequestError(f"unknown learning settings in {where}: {sorted(unknown)}; known: {sorted(_KEYS)}")
    return kw


def find_jac_toml(start: Path) -> Path | None:
    for d in (start, *start.parents):
        if (d / "jac.toml").is_file():
            return d / "jac.toml"
    return None


class Policy:
    """The settings of every task in one process: read from jac.toml (found from `start`,
    default the working directory) and the environment on first use, changed by
    `configure`. Thread-safe; each `for_task` answer is an immutable TaskPolicy."""

    def __init__(self, start: str | os.PathLike | None = None):
        self._start = Path(start) if start is not None else None
        self._lock = threading.Lock()
        self._global: dict[str, Any] = {}
        self._tasks: dict[str, dict[str, Any]] = {}
        self._loaded = False

    def _load_sources(self) -> None:
        if self._loaded:
            return
        path = find_jac_toml(self._start or Path.cwd())
        if path is not None:
            try:
                section = tomllib.loads(path.read_text()).get("plugins", {}).get("mtllm_locally", {})
            except tomllib.TOMLDecodeError as e:
                raise InvalidRequestError(f"{path}: {e}") from e
            section = dict(section) if isinstance(section, dict) else {}
            tasks = section.pop("tasks", {})
            self._global.update(_check(section, str(path)))
            for fn, kw in tasks.items():
                self._tasks.setdefault(fn, {}).update(_check(dict(kw), f"{path} [tasks.{fn}]"))
        if os.environ.get("MTLLM_LOCALLY_TEACHER"):
            self._global["teacher"] = os.environ["MTLLM_LOCALLY_TEACHER"]
        if os.environ.get("MTLLM_LOCALLY_LEARN") == "0":
            self._global["learn"] = False
        if os.environ.get("MTLLM_LOCALLY_VLLM_URL"):
            self._global["vllm"] = {**self._global.get("vllm", {}), "base_url": os.environ["MTLLM_LOCALLY_VLLM_URL"]}
        self._loaded = True

    def configure(self, function: str | None = None, **settings) -> None:
        """Change the policy globally, or for one Jac function (`function="classify"`)."""
        with self._lock:
            self._load_sources()
            target = self._global if function is None else self._tasks.setdefault(function, {})
            before = dict(target)
            target.update(_check(settings, "configure_learning()"))
            try:
                self._resolve(function)  # validate now, not at the next call
            except BaseException:
                target.clear()
                target.update(before)
                raise

    def reset(self) -> None:
        """Forget every setting, jac.toml and environment included (read again on next use)."""
        with self._lock:
            self._global.clear()
            self._tasks.clear()
            self._loaded = False

    def for_task(self, function: str | None) -> TaskPolicy:
        with self._lock:
            self._load_sources()
            return self._resolve(function)

    def _resolve(self, function: str | None) -> TaskPolicy:
        layers = [self._global]
        if function is not None:
            layers += [self._tasks.get(function, {}), self._tasks.get(function.rsplit(".", 1)[-1], {})]
        kw: dict[str, Any] = {}
        for layer in layers:
            for k, v in layer.items():
                kw[k] = {**kw.get(k, {}), **v} if k in _NESTED and isinstance(v, dict) else v
        if os.environ.get("MTLLM_LOCALLY_VLLM") == "0":  # the switch wins over every table
            kw["vllm"] = {**kw.get("vllm", {}), "enabled": False}
        return replace(TaskPolicy(), **kw)

    def describe(self, function: str | None) -> dict:
        return asdict(self.for_task(function))
