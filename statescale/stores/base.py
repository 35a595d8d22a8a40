"""The contract every session store keeps.

A store holds records: a session ID maps to its JSON-encoded fields and its creation
time. Two timeouts bound a record's life:

* ``idle_timeout``: a record unused for this long is gone (sliding: each load and each
  save starts it again);
* ``absolute_lifetime``: a record older than this is gone, however busy it is;
* ``first_lifetime``: a new record whose client has not come back with its cookie yet
  lives only this long (minutes, not the idle timeout), so a flood of one-shot
  anonymous sessions is cheap; the client's first return extends it to the idle timeout.

Load refreshes the idle timeout; save applies only the changed fields, so two requests
that change different keys of one session do not overwrite each other.

Versions (optional): a store that numbers a record's states returns the new number from
``save`` and ``create``; the middleware hands it back to the client in a cookie, and the
client's next request asks ``load`` for at least that version, so a store that serves
from per-process copies can tell a copy that lags the client's own last write.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

from ..exceptions import ConfigError
from ..session import Changes, Record, Written

CREATED_FIELD = "\x00created"  # the stores' own field; the session forbids keys with NUL


@runtime_checkable
class Store(Protocol):
    """Where sessions live. Every method may raise :class:`~statescale.StoreError`."""

    name: str

    @property
    def per_process(self) -> bool:
        """True when every process has its own sessions (correct only with one process
        or behind sticky routing); the middleware warns under several workers."""

    def load(self, session_id: str, *, min_version: int = 0) -> Record | None:
        """The record, refreshing its idle timeout; ``None`` if unknown or expired.
        ``min_version``: the newest version this client has seen written."""

    def save(self, session_id: str, changes: Changes, *, created: float) -> int | None:
        """Apply ``changes`` to an existing record, all or nothing; the new version
        (0: the store keeps none). ``None`` when no record stands under that ID any more
        (expired, flushed, evicted, deleted): then nothing was written, and every copy
        of the record is dropped."""

    def create(
        self,
        session_id: str,
        fields: Mapping[str, bytes],
        *,
        created: float | None = None,
        replaces: str | None = None,
    ) -> Written:
        """Write a whole record and delete ``replaces`` in the same step; returns the
        creation time it stored (``created``, or now) and the record's version. A
        record that replaces none is new: it gets the first lifetime until it is
        loaded again."""

    def delete(self, session_id: str) -> None:
        """Remove a record; unknown IDs are fine."""

    def lock(self, session_id: str) -> AbstractContextManager[None]:
        """Hold off other requests of this session until the context exits."""


class Lifetime:
    """The timeouts, checked once at construction."""

    __slots__ = ("absolute", "first", "idle")

    def __init__(
        self, idle_timeout: float, absolute_lifetime: float | None, first_lifetime: float
    ) -> None:
        if idle_timeout <= 0:
            raise ConfigError(f"idle_timeout must be > 0 seconds, not {idle_timeout!r}")
        if absolute_lifetime is not None and absolute_lifetime < idle_timeout:
            raise ConfigError(
                f"absolute_lifetime ({absolute_lifetime}s) is shorter than idle_timeout "
                f"({idle_timeout}s); raise it or set it to None"
            )
        if not first_lifetime > 0:
            raise ConfigError(f"first_lifetime must be > 0 seconds, not {first_lifetime!r}")
        self.idle = float(idle_timeout)
        self.absolute = None if absolute_lifetime is None else float(absolute_lifetime)
        self.first = min(float(first_lifetime), self.idle)

    def remaining(self, created: float, now: float, *, first: bool = False) -> float:
        """Seconds a record created at ``created`` may still live, from ``now``
        (``<= 0``: it is over); ``first``: a new record nobody has come back to."""
        idle = self.first if first else self.idle
        if self.absolute is None:
            return idle
        return min(idle, created + self.absolute - now)
