"""The seeded corpus: case number N of seed S is always the same case.

Each case is rebuilt from (seed, index) wherever it runs, so nothing but two integers
ever crosses a process boundary, and `python -m mtllm_locally.fuzz --seed S --case N`
reproduces it exactly. The index picks the kind (round robin over KINDS, weighted by
repetition); a `random.Random` seeded with "S:N" picks everything else. Building a
case is cheap and pure: files are written only when the case runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

# kind -> module with `make(rng) -> (label, desc, run)`; repeated names get more cases
KINDS = ("model", "adapter", "schema", "grammar", "sampling", "messages", "template", "requests",
         "model", "adapter", "schema", "grammar", "sampling", "messages", "template", "requests",
         "model", "adapter", "config")


@dataclass
class Case:
    seed: int
    index: int
    kind: str
    label: str                      # the class of input, e.g. "model/block_count"
    desc: str                       # what exactly this case does, for a human
    run: Callable[["Context"], object]

    @property
    def repro(self) -> str:
        return f"python -m mtllm_locally.fuzz --seed {self.seed} --case {self.index}"


def rng_for(seed: int, index: int) -> random.Random:
    return random.Random(f"{seed}:{index}")


def kind_of(index: int, kinds: tuple[str, ...] | None = None) -> str:
    cycle = KINDS if not kinds else tuple(k for k in KINDS if k in kinds)
    return cycle[index % len(cycle)]


def make_case(seed: int, index: int, kinds: tuple[str, ...] | None = None) -> Case:
    from . import (adapters, configs, grammars, messages, model_files, requests, sampling, schemas,
                   templates)

    modules = {"model": model_files, "adapter": adapters, "schema": schemas, "grammar": grammars,
               "sampling": sampling, "messages": messages, "template": templates, "requests": requests,
               "config": configs}
    kind = kind_of(index, kinds)
    label, desc, run = modules[kind].make(rng_for(seed, index))
    return Case(seed, index, kind, f"{kind}/{label}", desc, run)


class Opaque:
    """A value of no JSON or Jinja type, with a stable repr (descriptions must not
    change from run to run)."""

    def __repr__(self) -> str:
        return "<Opaque>"


def short(value, limit: int = 160) -> str:
    """repr() cut to a readable length (cases hold megabyte strings)."""
    try:
        r = repr(value)
    except Exception as e:  # noqa: BLE001 - a fuzz value may refuse repr
        r = f"<unrepresentable {type(value).__name__}: {e}>"
    return r if len(r) <= limit else r[: limit - 20] + f"...<{len(r)} chars>"
