"""Sessions in this process's memory: bounded (LRU), with the same timeouts as Redis.

Use it for one process, for tests, or behind sticky routing, where every request of a
session reaches the same process. Do not use it under several gunicorn workers without
sticky routing: each worker has its own dict, so a user's next request lands on a worker
that has never seen the session (the middleware warns loudly when this happens).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from ..config import DEFAULT_ABSOLUTE_LIFETIME, DEFAULT_IDLE_TIMEOUT
from ..exceptions import ConfigError, LockTimeout
from ..session import Changes, Record, Written
from .base import Lifetime

_STRIPES = 64


class _Entry:
    __slots__ = ("created", "expires", "fields")

    def __init__(self, fields: dict[str, bytes], created: float, expires: float) -> None:
        self.fields = fields
        self.created = created
        self.expires = expires


class MemoryStore:
    """A per-process, thread-safe store of at most ``max_sessions`` sessions.

    When full, the least recently used session is evicted. ``lock_wait`` bounds how long
    :meth:`lock` waits for another thread of this process holding the same session.
    """

    name = "memory"
    per_process = True

    def __init__(
        self,
        *,
        max_sessions: int = 10_000,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        absolute_lifetime: float | None = DEFAULT_ABSOLUTE_LIFETIME,
        lock_wait: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_sessions < 1:
            raise ConfigError(f"max_sessions must be >= 1, not {max_sessions!r}")
        self.max_sessions = max_sessions
        self.lifetime = Lifetime(idle_timeout, absolute_lifetime)
        self.lock_wait = lock_wait
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._mutex = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]

    def __len__(self) -> int:
        return len(self._entries)

    def _live(self, session_id: str, now: float) -> _Entry | None:
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        if entry.expires <= now or self.lifetime.remaining(entry.created, now) <= 0:
            del self._entries[session_id]
            return None
        self._entries.move_to_end(session_id)
        entry.expires = now + self.lifetime.remaining(entry.created, now)
        return entry

    def load(self, session_id: str, *, min_version: int = 0) -> Record | None:
        now = self._clock()
        with self._mutex:
            entry = self._live(session_id, now)
            return None if entry is None else Record(dict(entry.fields), entry.created)

    def save(self, session_id: str, changes: Changes, *, created: float) -> int | None:
        now = self._clock()
        with self._mutex:
            entry = self._live(session_id, now)
            if entry is None:  # expired or evicted since it was loaded
                return None
            for key in changes.deleted:
                entry.fields.pop(key, None)
            entry.fields.update(changes.set)
        return 0  # one process, one copy: no versions needed

    def create(
        self,
        session_id: str,
        fields: Mapping[str, bytes],
        *,
        created: float | None = None,
        replaces: str | None = None,
    ) -> Written:
        now = self._clock()
        created = now if created is None else created
        entry = _Entry(dict(fields), created, now + self.lifetime.remaining(created, now))
        with self._mutex:
            if replaces is not None:
                self._entries.pop(replaces, None)
            self._entries[session_id] = entry
            self._entries.move_to_end(session_id)
            while len(self._entries) > self.max_sessions:
                self._entries.popitem(last=False)
        return Written(created)

    def delete(self, session_id: str) -> None:
        with self._mutex:
            self._entries.pop(session_id, None)

    @contextmanager
    def lock(self, session_id: str) -> Iterator[None]:
        stripe = self._stripes[hash(session_id) % _STRIPES]  # per process: hash() is fine
        if not stripe.acquire(timeout=self.lock_wait):
            raise LockTimeout(self.lock_wait)
        try:
            yield
        finally:
            stripe.release()
