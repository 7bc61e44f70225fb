"""A seeded fuzzer for everything a program or a file can hand the engine.

mtllm_locally runs inside the user's process, so no input may end it: model and
adapter files, JSON schemas, grammars, sampling parameters, messages, chat templates,
engine settings and request patterns (cancels, closes, unloads) must each end in a
result or an exception from mtllm_locally.errors, with the engine still serving.

    corpus.py    case N of seed S, rebuilt identically anywhere
    gguf_file.py / tiny.py   our own GGUF serializer and the valid tiny model/adapter
    model_files.py, adapters.py, schemas.py, grammars.py, sampling.py, messages.py,
    templates.py, configs.py, requests.py   the generators, one input class each
    child.py     runs a batch of cases against one engine, reports line by line
    harness.py   batches in children; crash / hang / unclean / dead; pins crashes

    python -m mtllm_locally.fuzz --cases 200 --seed 1      # a run
    python -m mtllm_locally.fuzz --seed 1 --case 37        # one case again
"""

from .corpus import KINDS, Case, make_case
from .harness import Fuzzer, FuzzResult, Outcome, run_fuzz

__all__ = ["KINDS", "Case", "Fuzzer", "FuzzResult", "Outcome", "make_case", "run_fuzz"]
