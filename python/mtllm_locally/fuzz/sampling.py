"""Sampling parameters: extreme, non-finite, negative and wrongly typed.

Each case sets one to three parameters to values from the table below (the int
extremes of C's int32/int64/uint32, NaN and infinities, strings where numbers go,
thousands of stop strings, megabyte stop strings, stop text that is special-token
markup). Python may refuse them with InvalidRequestError; whatever it accepts must
run to a normal finish on the scheduler thread.
"""

from __future__ import annotations

import random

from .context import DRIVES, HELLO, drive
from .corpus import short

NAN, INF = float("nan"), float("inf")
INTS = (0, 1, -1, 2, 2**31 - 1, -2**31, 2**31, 2**32 - 1, 2**32, 2**63 - 1, -2**63, 2**64, 10**30)
FLOATS = (0.0, -0.0, 1.0, -1.0, 1e-45, 5e-324, 1e38, 1e308, NAN, INF, -INF, 0.5, 2.0)
WRONG = ("1", None, [], {}, True, 1.5, 1j, b"1", object)

VALUES = {
    "max_tokens": INTS + WRONG,
    "temperature": FLOATS + WRONG,
    "top_p": FLOATS + WRONG,
    "top_k": INTS + WRONG,
    "min_p": FLOATS + WRONG,
    "repeat_penalty": FLOATS + WRONG,
    "repeat_last_n": INTS + WRONG,
    "seed": INTS + (1.5, "7", None, -1),
    "ignore_eos": (True, False, "yes", 2, None, 0.0),
    "stop": None,  # built below
    "bogus_param": (1,),
}


def _stop(r):
    return r.choice((
        "", "\n", ["a"] * 10000, [str(i) for i in range(10000)], "x" * (1 << 20), ["y" * (1 << 16)] * 16,
        ["<|im_end|>", "<|im_start|>"], [""], [None], [5], 5, {"a"}, ["\ud800"], ["\0"], ["é" * 1000],
        ("a", b"b"), ["<|endoftext|>"] * 3, "<|im_end|>",
    ))


def make(r: random.Random):
    names = r.sample([n for n in VALUES if n != "bogus_param"], r.choice((1, 1, 2, 3)))
    if r.random() < 0.03:
        names.append("bogus_param")
    kw = {}
    for n in names:
        kw[n] = _stop(r) if n == "stop" else r.choice(VALUES[n])
    # keep runaway lengths short on the tiny model unless max_tokens itself is fuzzed
    base = {"max_tokens": 16} if "max_tokens" not in kw else {}
    how = r.choice(DRIVES)
    label = "+".join(sorted(names))

    def run(ctx):
        drive(ctx.shared_engine(), how, messages=HELLO, **base, **kw)

    return label, f"{', '.join(f'{k}={short(v, 50)}' for k, v in kw.items())}; {how}", run
