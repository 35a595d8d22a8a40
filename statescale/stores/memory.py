"""Sessions in this process's memory: bounded, with the same timeouts as Redis.

Use it for one process, for tests, or behind sticky routing, where every request of a
session reaches the same process. Do not use it under several gunicorn workers without
sticky routing: each worker has its own dict, so a user's next request lands on a worker
that has never seen the session (the middleware warns loudly when this happens).

When full it evicts in two segments (a segmented LRU): a new session waits on
*probation*, with the short first lifetime, until its client comes back with the cookie,
which *protects* it. Eviction takes the least recently used session on probation first,
so a flood of one-shot anonymous sessions never pushes out a session whose user returned.

Each record counts its writes and its moves (its *version*), which a hand-over carries:
a copy that leaves a process moves on to the next version (:meth:`Kept.moved`). A copy
that arrives from another process (:meth:`MemoryStore.put`) replaces only an older one,
is not kept if older than the one this process gave away lately, and never revives a
session this process deleted or replaced lately. So a late or duplicate hand-over cannot
undo a write: a duplicate of a copy this process received is older than the one it gave
away since, even if nobody wrote in between.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any, NamedTuple

from ..config import (
    DEFAULT_ABSOLUTE_LIFETIME,
    DEFAULT_FIRST_LIFETIME,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MEMORY_SESSIONS,
)
from ..exceptions import ConfigError, LockTimeout
from ..session import Changes, Record, Written
from .base import Lifetime

PROTECTED_SHARE = 0.8  # of max_sessions, at most, for sessions whose client came back
#: Sessions given away lately, whose versions a store remembers (a hand-over of an
#: older copy arriving late is refused), and, as many again, sessions deleted or
#: replaced lately (never revived): a scale-out that gives away many sessions does not
#: push out the marks of logouts.
MAX_LEFT = 10_000
_DELETED = sys.maxsize  # the version a deleted session's copy would need: none has it
UNCOUNTED = -1  # the version of a copy from a process that does not count writes


class ProcessLocks:
    """Per-session locks of this process: one for each session a thread holds or
    waits for, dropped when none does (so their number is that of the requests in
    flight). ``wait`` bounds how long a thread waits for another holding the same
    session. No two sessions share one: a request that holds its session a long time
    (its handler is slow, or it asks a peer for it) makes no other session wait."""

    def __init__(self, wait: float = 5.0) -> None:
        self.wait = wait
        self._guard = threading.Lock()
        self._locks: dict[str, _Held] = {}

    @contextmanager
    def lock(self, session_id: str) -> Iterator[None]:
        with self._guard:
            held = self._locks.get(session_id)
            if held is None:
                held = self._locks[session_id] = _Held()
            held.users += 1
        try:
            if not held.lock.acquire(timeout=self.wait):
                raise LockTimeout(self.wait)
            try:
                yield
            finally:
                held.lock.release()
        finally:
            with self._guard:
                held.users -= 1
                if not held.users:
                    del self._locks[session_id]


class _Held:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0  # threads that hold or wait for it


class Kept(NamedTuple):
    """A record as this store keeps it: when it expires, and whether its client has
    come back (what a hand-over carries, so the next process keeps it the same way)."""

    record: Record
    expires: float
    returned: bool
    version: int = 0  # writes and moves since the record was created; UNCOUNTED: not known

    def moved(self) -> Kept:
        """This copy as it leaves for another process: at the next version."""
        return self._replace(version=self.version + 1)


class _Entry:
    __slots__ = ("created", "expires", "fields", "version")

    def __init__(
        self, fields: dict[str, bytes], created: float, expires: float, version: int = 0
    ) -> None:
        self.fields = fields
        self.created = created
        self.expires = expires
        self.version = version

    def kept(self, returned: bool) -> Kept:
        """A copy of this record as a hand-over carries it."""
        return Kept(Record(dict(self.fields), self.created), self.expires, returned, self.version)


class MemoryStore:
    """A per-process, thread-safe store of at most ``max_sessions`` sessions.

    ``lock_wait`` bounds how long :meth:`lock` waits for another thread of this process
    holding the same session.
    """

    name = "memory"
    per_process = True

    def __init__(
        self,
        *,
        max_sessions: int = DEFAULT_MEMORY_SESSIONS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        absolute_lifetime: float | None = DEFAULT_ABSOLUTE_LIFETIME,
        first_lifetime: float = DEFAULT_FIRST_LIFETIME,
        lock_wait: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_sessions < 1:
            raise ConfigError(f"max_sessions must be >= 1, not {max_sessions!r}")
        self.max_sessions = max_sessions
        self.lifetime = Lifetime(idle_timeout, absolute_lifetime, first_lifetime)
        self._clock = clock
        self._probation: OrderedDict[str, _Entry] = OrderedDict()  # new, not returned to
        self._protected: OrderedDict[str, _Entry] = OrderedDict()  # their clients came back
        self._given: OrderedDict[str, int] = OrderedDict()  # given away lately -> version
        self._deleted: OrderedDict[str, None] = OrderedDict()  # deleted or replaced lately
        self._mutex = threading.Lock()
        self._locks = ProcessLocks(lock_wait)

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)

    def _live(self, session_id: str, now: float, *, returning: bool) -> _Entry | None:
        """The entry, if it has not expired; ``returning``: its client is back, so a
        session on probation is protected from now on."""
        segment = self._protected
        entry = segment.get(session_id)
        if entry is None:
            segment = self._probation
            entry = segment.get(session_id)
            if entry is None:
                return None
        if entry.expires <= now or self.lifetime.remaining(entry.created, now) <= 0:
            del segment[session_id]
            return None
        if returning and segment is self._probation:
            del segment[session_id]
            segment = self._protected
            segment[session_id] = entry
            self._demote()
        segment.move_to_end(session_id)
        first = segment is self._probation
        entry.expires = now + self.lifetime.remaining(entry.created, now, first=first)
        return entry

    def load(self, session_id: str, *, min_version: int = 0) -> Record | None:
        now = self._clock()
        with self._mutex:
            entry = self._live(session_id, now, returning=True)
            return None if entry is None else Record(dict(entry.fields), entry.created)

    def save(self, session_id: str, changes: Changes, *, created: float) -> int | None:
        now = self._clock()
        with self._mutex:
            entry = self._live(session_id, now, returning=False)
            if entry is None:  # expired or evicted since it was loaded
                return None
            for key in changes.deleted:
                entry.fields.pop(key, None)
            entry.fields.update(changes.set)
            entry.version += 1
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
        first = replaces is None  # a new session; one that replaces another has returned
        expires = now + self.lifetime.remaining(created, now, first=first)
        entry = _Entry(dict(fields), created, expires)
        with self._mutex:
            if replaces is not None:
                self._drop(replaces, _DELETED)
            self._forget(session_id)  # live again, whatever it was
            segment = self._probation if first else self._protected
            segment[session_id] = entry
            segment.move_to_end(session_id)
            self._demote()
            while len(self) > self.max_sessions:  # probation first
                (self._probation or self._protected).popitem(last=False)
        return Written(created)

    def _demote(self) -> None:
        """Keep room on probation: past ``PROTECTED_SHARE`` of the store, the least
        recently used protected session goes back on probation (it is evicted before
        the others only if nobody uses it while it waits there)."""
        while len(self._protected) > self.max_sessions * PROTECTED_SHARE:
            session_id, entry = self._protected.popitem(last=False)
            self._probation[session_id] = entry

    def holds(self, session_id: str) -> bool:
        """Whether a live record stands under ``session_id`` (touching nothing)."""
        with self._mutex:
            entry = self._protected.get(session_id) or self._probation.get(session_id)
            return entry is not None and entry.expires > self._clock()

    def take(self, session_id: str, version: int | None = None) -> Kept | None:
        """Remove a live record and return it as it leaves for another process (moved
        on, :meth:`Kept.moved`); with ``version``, only if the record is still at that
        version. The version it left at is remembered: see :meth:`put`."""
        now = self._clock()
        with self._mutex:
            returned = session_id in self._protected
            segment = self._protected if returned else self._probation
            entry = segment.get(session_id)
            if entry is None or (version is not None and entry.version != version):
                return None
            del segment[session_id]
            if not self._alive(entry, now):
                return None
            kept = entry.kept(returned).moved()
            self._drop(session_id, kept.version)
            return kept

    def items(self) -> list[tuple[str, Kept]]:
        """Every live record, as held here (a copy sent from these moves on first)."""
        now = self._clock()
        with self._mutex:
            return [
                (sid, e.kept(segment is self._protected))
                for segment in (self._probation, self._protected)
                for sid, e in segment.items()
                if self._alive(e, now)
            ]

    def put(self, session_id: str, kept: Kept) -> bool:
        """Keep a record handed over by another process as it was there: its expiry,
        and whether its client had come back; whether it was kept. It is not if it has
        expired meanwhile, if this store holds a copy as new or gave away a newer one
        (a hand-over that arrives twice, or late, cannot undo a write), or if this
        store deleted or replaced the session lately."""
        now = self._clock()
        entry = _Entry(dict(kept.record.fields), kept.record.created, kept.expires, kept.version)
        if not self._alive(entry, now):
            return False
        with self._mutex:
            left = _DELETED if session_id in self._deleted else self._given.get(session_id, 0)
            held = self._protected.get(session_id) or self._probation.get(session_id)
            if held is not None and not self._alive(held, now):
                held = None
            if kept.version == UNCOUNTED:  # (an older release's) kept as it used to be:
                if held is not None or left == _DELETED:  # never over a copy held here
                    return False
                entry.version = left  # and counted on from what is known
            elif kept.version < left or (held is not None and held.version >= kept.version):
                return False
            self._forget(session_id)
            self._probation.pop(session_id, None)
            self._protected.pop(session_id, None)
            segment = self._protected if kept.returned else self._probation
            segment[session_id] = entry
            self._demote()
            while len(self) > self.max_sessions:  # probation first
                (self._probation or self._protected).popitem(last=False)
        return True

    def superseded(self, session_id: str, kept: Kept) -> bool:
        """Whether this store gave away lately a newer copy of ``session_id`` than
        ``kept`` (so :meth:`put` refused it): that one is somewhere else."""
        with self._mutex:
            given = self._given.get(session_id, UNCOUNTED)
        return kept.version != UNCOUNTED and kept.version < given

    def _alive(self, entry: _Entry, now: float) -> bool:
        return entry.expires > now and self.lifetime.remaining(entry.created, now) > 0

    def delete(self, session_id: str) -> None:
        with self._mutex:
            self._drop(session_id, _DELETED)

    def _drop(self, session_id: str, version: int) -> None:
        """Drop a session; for a while, refuse hand-overs of copies older than
        ``version`` (under ``_mutex``)."""
        self._probation.pop(session_id, None)
        self._protected.pop(session_id, None)
        if version == _DELETED:
            self._given.pop(session_id, None)
            marks: OrderedDict[str, Any] = self._deleted
            marks[session_id] = None
        else:
            marks = self._given
            marks[session_id] = version
        marks.move_to_end(session_id)
        if len(marks) > MAX_LEFT:
            marks.popitem(last=False)

    def _forget(self, session_id: str) -> None:
        """Live here again: no mark of its leaving stands (under ``_mutex``)."""
        self._given.pop(session_id, None)
        self._deleted.pop(session_id, None)

    @property
    def lock_wait(self) -> float:
        return self._locks.wait

    @lock_wait.setter
    def lock_wait(self, seconds: float) -> None:
        self._locks.wait = seconds

    def lock(self, session_id: str) -> AbstractContextManager[None]:
        return self._locks.lock(session_id)
