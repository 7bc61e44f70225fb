"""Engine settings: each EngineConfig field at an extreme or of the wrong type.

An engine that cannot be built as asked must say so with InvalidRequestError (or
ModelLoadError / EngineError from llama.cpp), never allocate the machine away or
abort. The fuzz children run under an address-space limit, so a setting that makes
llama.cpp reserve terabytes fails an allocation instead of paging the host to death.
"""

from __future__ import annotations

import random

from .context import HELLO
from .corpus import short

BIG = (2**31 - 1, 2**31, 2**32, 2**63 - 1, 10**30)
VALUES = {
    "n_ctx": (0, 15, 16, 17, 1 << 20, -1) + BIG + ("512", 1.5, None),
    "n_batch": (1, 2, 7, 1 << 20, 0, -1) + BIG + ("1",),
    "max_running": (1, 255, 256, 257, 1024, 0, -1) + BIG,
    "cache_sequences": (0, 255, 256, 1024, -1) + BIG,
    "max_queued": (0, 1, -1) + BIG,
    "n_threads": (1, 3, 512, 513, 100000, -1) + BIG,
    "n_gpu_layers": (0, 1, 1000, -1) + BIG,
    "flash_attn": (True, False, None, 2, "yes", -1),
    "kv_f32": (True, False, "no", 2),
    "prefix_reuse": (True, False, None, "x"),
    "use_mmap": (True, False, None),
    "bogus_setting": (1,),
}


def make(r: random.Random):
    names = r.sample([n for n in VALUES if n != "bogus_setting"], r.choice((1, 1, 2)))
    if r.random() < 0.03:
        names.append("bogus_setting")
    cfg = {n: r.choice(VALUES[n]) for n in names}

    def run(ctx):
        eng = ctx.new_engine(**cfg)
        eng.generate(messages=HELLO, max_tokens=4)

    return "+".join(sorted(names)), ", ".join(f"{k}={short(v, 30)}" for k, v in cfg.items()), run
