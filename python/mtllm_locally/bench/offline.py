"""Running a program with every socket refused: a `sitecustomize` that makes connect,
create_connection and getaddrinfo raise, put first on the child's PYTHONPATH. The
Jac tests and the typed bench run `jac run` this way, to show nothing reaches the network."""

from __future__ import annotations

import os
from pathlib import Path

SITECUSTOMIZE = """\
import socket
def _refuse(*a, **k):
    raise OSError("network blocked by mtllm_locally's offline guard")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
"""


def offline_pythonpath(workdir: Path, inherited: str | None = None) -> str:
    """Writes the guard under `workdir`; returns the PYTHONPATH that loads it (first, then `inherited`)."""
    guard = Path(workdir) / "_offline"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return os.pathsep.join(p for p in (str(guard), inherited) if p)
