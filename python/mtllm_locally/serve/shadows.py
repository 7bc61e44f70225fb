"""The students running in shadow (teacher mode, teacher.py). A call the teacher
answered returns with the teacher's answer at once; its student request goes on in
the engine, and one daemon thread, owned by the runtime, stores the student's answer
into the already-captured turn when it finishes.

A shadow never fails or delays a call: its errors are logged at debug and dropped.
Closing cancels the shadows still running and drops their answers; it waits for the
thread a bounded time (a cancelled request finishes at the engine's next step), so
that the thread is out of native code before the interpreter finalizes.
"""

from __future__ import annotations

import atexit
import collections
import logging
import threading
from typing import Callable

from ..engine import Request

log = logging.getLogger("mtllm_locally.shadows")

JOIN_S = 5.0  # close(): how long to wait for the thread once every shadow is cancelled


class Shadows:
    """Pending shadows, oldest first, awaited by one thread (started on first use).

    `record(invocation_id, turn_index, text)` stores a finished shadow's answer."""

    def __init__(self, record: Callable[[str, int, str], None]):
        self._record = record
        self._cv = threading.Condition()
        self._pending: collections.deque[tuple[Request, str, int]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Shadows followed and not yet recorded or dropped."""
        with self._cv:
            return len(self._pending)

    def follow(self, request: Request, invocation_id: str, turn_index: int) -> None:
        """Store `request`'s answer into this turn when it finishes (after close: cancel it)."""
        with self._cv:
            if not self._closed:
                self._pending.append((request, invocation_id, turn_index))
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="mtllm-shadows", daemon=True)
                    self._thread.start()
                    atexit.register(self.close)  # out of native code before the interpreter finalizes
                self._cv.notify_all()
                return
        request.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Until every shadow followed so far is recorded or dropped; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._pending, timeout)

    def close(self) -> None:
        """Cancel the shadows still running, drop their answers, and end the thread."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            pending = [req for req, _, _ in self._pending]
            thread = self._thread
            self._cv.notify_all()
        for req in pending:
            req.cancel()
        if thread is not None:
            atexit.unregister(self.close)
            if thread is not threading.current_thread():
                thread.join(JOIN_S)
        with self._cv:
            self._pending.clear()
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
                req, inv, turn = self._pending[0]
            try:
                done = req.result()  # oldest first: the engine runs them all meanwhile
                if done.finish_reason != "cancelled" and not self._closed:
                    self._record(inv, turn, done.text)
            except Exception as e:  # the shadow never fails anything
                log.debug("shadow answer for %s turn %d dropped: %s: %s", inv, turn, type(e).__name__, e)
            finally:
                with self._cv:
                    if self._pending and self._pending[0][0] is req:
                        self._pending.popleft()
                    self._cv.notify_all()
