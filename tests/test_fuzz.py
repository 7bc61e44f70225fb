"""The fuzz corpus at CI size: a fixed seed over every input class; nothing may crash,
hang, escape as a non-MtllmError, or leave the engine unable to serve.

`python -m mtllm_locally.bench robustness` runs the same corpus at full size (>= 2,000
cases). A failure message lists each failing class with the command that reproduces
its first case: python -m mtllm_locally.fuzz --seed 20251 --case N
"""

from __future__ import annotations

import pytest

from mtllm_locally.fuzz import KINDS, make_case, run_fuzz
from mtllm_locally.fuzz.gguf_file import read_kvs
from mtllm_locally.fuzz.tiny import tiny_llama

SEED = 20251
N_CASES = 152        # eight rounds of the kind cycle; ~50 s on the 2-core CI machine (2 children at a time)
CASE_TIMEOUT_S = 30.0  # a call that blocks the host this long is a hang


def test_corpus_is_deterministic():
    a = [make_case(SEED, i) for i in range(40)]
    b = [make_case(SEED, i) for i in range(40)]
    assert [(c.label, c.desc) for c in a] == [(c.label, c.desc) for c in b]
    assert {c.kind for c in a} == set(KINDS)


def test_tiny_model_is_a_valid_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    tiny_llama().write(path)
    keys = {kv.key for kv in read_kvs(str(path))}
    assert {"general.architecture", "llama.block_count", "tokenizer.ggml.tokens"} <= keys


def test_fuzz_ci_size():
    result = run_fuzz(N_CASES, seed=SEED, timeout=CASE_TIMEOUT_S, batch=19, jobs=2)
    c = result.counts
    assert c["cases"] == N_CASES
    assert {o.label.split("/")[0] for o in result.outcomes} == set(KINDS)
    bad = {k: c[k] for k in ("crashes", "hangs", "unclean", "dead", "harness_errors") if c[k]}
    if bad:
        pytest.fail(f"{bad}\n{result.report()}", pytrace=False)
