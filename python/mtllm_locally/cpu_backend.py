"""Which CPU weight layouts llama.cpp may use in this process (cpp/cpu_backend.h).

llama.cpp puts weights in "extra" CPU buffer types when a kernel for them exists:
CPU_REPACK (interleaved Q4_0/Q8_0/... for AVX2/AVX-512/NEON), KleidiAI on Arm, and
AMX on Intel Xeon 4th gen and later. The AMX matmul segfaults on every batch of more
than one token (llama.cpp #20824, closed without a fix), which in-process means the
user's program dies at its first prompt. So AMX is never enabled unless the user
asks for it with MTLLM_LOCALLY_ALLOW_AMX=1; the others stay. `bench robustness`
measures what AMX would give where it runs (README, "AMX").
"""

from __future__ import annotations

import os

from . import _engine

# Buffer types we refuse by default, and why.
UNSAFE = {"AMX": "llama.cpp's AMX matmul crashes on batches of more than one token (llama.cpp #20824)"}


def allowed(available: list[str], allow_amx: bool) -> list[str]:
    """The policy, separate from the machine so that it is tested on every machine."""
    return [name for name in available if name not in UNSAFE or (name == "AMX" and allow_amx)]


def apply() -> list[str]:
    """Enable the allowed types, process-wide, for models loaded from now on."""
    allow_amx = os.environ.get("MTLLM_LOCALLY_ALLOW_AMX", "0") == "1"
    return _engine.cpu_extra_buffer_types_enable(allowed(_engine.cpu_extra_buffer_types_available(), allow_amx))


def report() -> dict:
    available = _engine.cpu_extra_buffer_types_available()
    enabled = _engine.cpu_extra_buffer_types_enabled()
    return {"available": available, "enabled": enabled,
            "refused": {n: UNSAFE[n] for n in available if n in UNSAFE and n not in enabled}}


ENABLED = apply()
