"""Failing fast while the store hangs: a circuit breaker for one process.

A hung Redis (SIGSTOP, a stalled network) answers nothing, so every command waits out
its timeout and its retry, about 0.8 s. Under load the requests queue behind one
another in each worker and a 503 takes seconds. The breaker opens on the first timeout:
from then on a request that needs Redis fails at once, unless a *probe* is due (every
``interval`` seconds), and a probe is one ``PING`` with a short timeout of its own. When
a probe is answered the breaker closes and requests go to Redis again, so a process
recovers by itself within ``interval`` of Redis answering.

Only timeouts open it, and a Sentinel discovery that found no master (which has waited
on each Sentinel that did not answer): a refused connection already fails in
microseconds, and an error reply is an answer. Per store and thread-safe.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable

from ...exceptions import StoreUnavailable

#: Seconds between probes while the breaker is open.
PROBE_INTERVAL = 0.25
#: Seconds a probe waits for PING's reply.
PROBE_TIMEOUT = 0.1


def _call(method: weakref.WeakMethod[Callable[[], None]]) -> None:
    function = method()
    if function is not None:
        function()


class Breaker:
    """``guard()`` before a command; ``tripped()`` when one timed out."""

    def __init__(
        self,
        probe: Callable[[], bool],
        *,
        interval: float = PROBE_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._open = False
        self._probing = False  # a thread is probing: the others fail fast meanwhile
        self._next_probe = 0.0
        self._reason = ""
        # A fork copies the lock as it stands (maybe held by another thread).
        reset = weakref.WeakMethod(self._reset_lock)
        os.register_at_fork(after_in_child=lambda: _call(reset))

    def _reset_lock(self) -> None:
        self._lock = threading.Lock()

    @property
    def open(self) -> bool:
        return self._open

    def guard(self, what: str) -> None:
        """Return if Redis may be asked now; else raise ``StoreUnavailable`` at once.
        One thread probes when a probe is due, outside the lock: the others fail fast
        meanwhile, not one after another behind a probe that may take its timeout (a
        Sentinel's discovery asks each Sentinel in turn)."""
        if not self._open:
            return
        with self._lock:
            if not self._open:
                return
            probe = self._clock() >= self._next_probe and not self._probing
            self._probing = self._probing or probe
            reason = self._reason
        if probe and self._probed():
            return
        raise StoreUnavailable("redis", f"{what}: not answering ({reason}); failing fast")

    def _probed(self) -> bool:
        """Probe; whether Redis answered (then the breaker is closed). The next probe is
        due ``interval`` after this one ended, however long it took."""
        answered = False
        try:
            answered = self._probe()
        finally:
            with self._lock:
                self._probing = False
                self._next_probe = self._clock() + self.interval
                if answered:
                    self._open = False
        return answered

    def tripped(self, reason: str) -> None:
        """A command timed out: fail fast until a probe is answered."""
        with self._lock:
            if not self._open:
                self._open = True
                self._next_probe = self._clock() + self.interval
            self._reason = reason
