"""Files under the store are their owner's only: prompts are private data.

`private_dir`, `private_open` and `make_private` are the one way either loop creates
or tightens a file or directory there (directories 0700, files 0600), whatever the
umask; a file another user owns (a shared store) keeps its owner's mode.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("mtllm_locally.store")

PRIVATE_DIR = 0o700   # the store holds the user's prompts: nobody else may list or read it
PRIVATE_FILE = 0o600


def private_dir(path: str | os.PathLike, *, tighten: bool = True) -> Path:
    """`mkdir -p` where every directory it creates is 0700 whatever the umask; with
    `tighten`, an existing `path` is made 0700 as well (its parents are left alone)."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:  # another process made it first
            if not d.is_dir():
                raise
            continue
        _chmod(d, PRIVATE_DIR)  # mkdir's mode is filtered by the umask
    if tighten and not missing:
        _chmod(path, PRIVATE_DIR)
    return path


def private_open(path: str | os.PathLike, mode: str = "w", **kwargs):
    """`open()` for a file under the store: created 0600, and an existing file is made 0600."""
    flags = {"w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
             "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL}[mode.replace("b", "").replace("+", "")[:1]]
    if "+" in mode:
        flags = (flags & ~os.O_WRONLY) | os.O_RDWR
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
    except OSError:  # not ours (a shared store): the owner's mode stands
        pass
    try:
        return os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise


def make_private(path: str | os.PathLike) -> None:
    """A file becomes 0600; a directory and everything under it 0700/0600. Symbolic
    links are neither followed nor changed; what this user may not chmod is left as is."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        return
    if not stat.S_ISDIR(st.st_mode):
        _chmod(path, PRIVATE_FILE, st)
        return
    _chmod(path, PRIVATE_DIR, st)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            try:
                st = os.lstat(p)
            except FileNotFoundError:  # removed meanwhile (a staging directory renamed)
                continue
            if not stat.S_ISLNK(st.st_mode):
                _chmod(p, PRIVATE_DIR if stat.S_ISDIR(st.st_mode) else PRIVATE_FILE, st)


def _chmod(path, mode: int, st: os.stat_result | None = None) -> None:
    try:
        if st is None:
            st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) == mode:
            return
        os.chmod(path, mode)
    except FileNotFoundError:
        pass
    except OSError as e:  # another user's file in a shared store: theirs to protect
        log.debug("cannot make %s private: %s", path, e)
