"""A process's copies of session records, by Redis key. Pure: the clock is injected,
and the caller (:mod:`.subscription`) holds the lock and feeds it invalidations.

Each copy carries the record's version. Why a copy served from here is current:

* It is dropped when Redis says the key changed (:meth:`Copies.invalidate`), and all
  copies are dropped when Redis can no longer say so (``invalidate(None)``).
* A read that was in flight when its key was invalidated is not kept: the reply may
  predate the change (the read-versus-invalidation race Redis's client-side caching
  docs warn of). Each read and write takes a *token* first; an invalidation after the
  token spoils it.
* A client's own writes: a copy older than the version the client was told
  (``min_version``) is not served, however late an invalidation arrives.
* This process's own writes apply to its copy only on top of the version just before
  (a write that returns version ``v`` finds the copy at ``v - 1``); anything else means
  someone else wrote in between, and the copy goes.
* Redis does not tell a connection of its own writes (``NOLOOP``), so a write of this
  process spoils every other read or write of that key still in flight here: with
  threads, one may be on the very connection the write went out on, and hold a reply
  from before it that no invalidation would ever follow. A read never replaces a copy
  with an older version either.
* A copy is read again from Redis at least every ``touch_interval`` seconds, so the
  idle timeout Redis keeps slides while the copy serves the reads.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

from ...session import Changes, Record


class _Copy:
    __slots__ = ("created", "expires", "fields", "fresh_until", "version")

    def __init__(
        self, fields: dict[str, bytes], created: float, version: int, expires: float, fresh: float
    ) -> None:
        self.fields = fields
        self.created = created
        self.version = version
        self.expires = expires  # when Redis expires the record (the store's clock)
        self.fresh_until = fresh  # when to read it from Redis again regardless


class Copies:
    """At most ``max_entries`` copies, least recently used dropped first."""

    def __init__(
        self, *, max_entries: int, touch_interval: float, clock: Callable[[], float]
    ) -> None:
        self.max_entries = max_entries
        self.touch_interval = touch_interval
        self._clock = clock
        self._copies: OrderedDict[str, _Copy] = OrderedDict()
        self._seq = 0  # bumped by every invalidation
        self._everything_at = 0  # the last invalidation of everything
        self._pending: dict[str, list[int]] = {}  # key -> [reads in flight, last invalidated]

    def __len__(self) -> int:
        return len(self._copies)

    def get(self, key: str, min_version: int = 0) -> Record | None:
        """The copy, if it is current; else ``None``: read Redis."""
        copy = self._copies.get(key)
        if copy is None or copy.version < min_version:
            return None
        if self._clock() >= min(copy.fresh_until, copy.expires):
            return None
        self._copies.move_to_end(key)
        return Record(dict(copy.fields), copy.created)

    def begin(self, key: str) -> int:
        """Before a read or write of ``key`` is sent: the token its :meth:`read`,
        :meth:`wrote` or :meth:`created` hands back."""
        pending = self._pending.get(key)
        if pending is None:
            self._pending[key] = [1, -1]
        else:
            pending[0] += 1
        return self._seq

    def _spoilt(self, key: str, token: int, *, wrote: bool = False) -> bool:
        """End what :meth:`begin` began: whether ``key`` was invalidated since. What
        ``wrote`` (or may have: it failed) spoils what else is in flight for ``key``."""
        pending = self._pending.get(key)
        if pending is None:  # forgotten meanwhile (a fork noticed late): trust nothing
            return True
        pending[0] -= 1
        spoilt = pending[1] > token or self._everything_at > token
        if pending[0] == 0:
            del self._pending[key]
        elif wrote:
            self._seq += 1
            pending[1] = self._seq
        return spoilt

    def read(
        self,
        key: str,
        token: int,
        record: Record | None,
        version: int,
        ttl_ms: int,
        *,
        wrote: bool = False,
    ) -> None:
        """What a read of ``key`` returned, or the whole record this process wrote
        (``wrote``; also when the read slid the idle timeout, a write): kept, unless
        invalidated meanwhile, or older than the copy already kept."""
        if self._spoilt(key, token, wrote=wrote) or record is None or version <= 0:
            self._copies.pop(key, None)
            return
        kept = self._copies.get(key)
        if kept is not None and kept.version > version:
            return  # a reply from before a write this process has applied since
        self._put(key, dict(record.fields), record.created, version, ttl_ms)

    def wrote(self, key: str, token: int, changes: Changes, version: int, ttl_ms: int) -> None:
        """This process applied ``changes`` to ``key``, which is now at ``version``."""
        copy = self._copies.get(key)
        if self._spoilt(key, token, wrote=True) or copy is None or copy.version != version - 1:
            self._copies.pop(key, None)
            return
        for field in changes.deleted:
            copy.fields.pop(field, None)
        copy.fields.update(changes.set)
        copy.version = version
        copy.expires = self._clock() + ttl_ms / 1000

    def drop(self, key: str) -> None:
        """Forget ``key`` (this process deleted it, or wants Redis's word on it)."""
        self.invalidate((key,))

    def invalidate(self, keys: Iterable[str] | None) -> None:
        """Redis says ``keys`` changed; ``None``: any key may have."""
        self._seq += 1
        if keys is None:
            self._copies.clear()
            self._everything_at = self._seq
            return
        for key in keys:
            self._copies.pop(key, None)
            pending = self._pending.get(key)
            if pending is not None:
                pending[1] = self._seq

    def forget_all(self) -> None:
        """A fork: nothing here is the child's, not even reads in flight."""
        self._copies.clear()
        self._pending.clear()
        self._everything_at = self._seq = self._seq + 1

    def _put(
        self, key: str, fields: dict[str, bytes], created: float, version: int, ttl_ms: int
    ) -> None:
        now = self._clock()
        self._copies[key] = _Copy(
            fields, created, version, now + ttl_ms / 1000, now + self.touch_interval
        )
        self._copies.move_to_end(key)
        while len(self._copies) > self.max_entries:
            self._copies.popitem(last=False)
