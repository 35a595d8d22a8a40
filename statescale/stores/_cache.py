"""A per-process copy of session records that every statescale write keeps current.

Each write to a session (see :mod:`statescale.stores.redis`) runs as one Lua script that
applies the change, bumps the record's version field, sets the expiry and ``PUBLISH``\\es
the change (a *delta*: fields set, fields deleted, the new TTL) on the store's channel,
tagged with the new version. Every process that caches subscribes to that channel on a
connection of its own and, before each lookup, applies what has arrived without blocking.

Why a copy served from here is current:

* Versions make the deltas safe to receive late, twice, or out of order: delta ``v``
  applies only on top of version ``v - 1``; an older one is ignored; a gap (a delta
  lost to a reconnect, say) drops the copy, so the next read goes to Redis.
* A record read from Redis is cached only if no newer delta for it arrived while the
  read was in flight (the read-versus-message race the Redis client-side-caching docs
  warn of).
* A client's own writes: each write returns the record's new version, the middleware
  hands it to the client in a cookie, and a copy older than the version a request
  carries is not served (the request reads Redis instead). So a client never sees a
  state older than its own last write, however late a change reaches this process.
* Everyone else's changes: Redis writes a delta to every subscriber in the same
  event-loop pass in which it answers the writer, so it reaches this process's socket
  microseconds after the writer's reply; each lookup drains the socket first. Only a
  request racing that window sees the state just before the change: a concurrent
  request of the same session (which has no order anyway) or a cookie replayed within
  microseconds of a logout. A broken subscription clears the copies and resubscribes.
* Unless the socket was full: then Redis (and the kernel) hold the rest back until the
  process reads, so one read does not bring everything. A drain that finds
  ``BACKLOG_BYTES`` or more waiting (a full socket holds several times that; a busy
  worker finds a few hundred bytes) may have met such a backlog, so the next lookup
  first *syncs*: it sends ``PING`` on the subscription and reads up to the reply, which
  Redis queues behind every change published before it. A worker that serves no request
  has its changes taken every ``IDLE_DRAIN`` seconds by a background thread, so Redis
  never holds much for it; its next request syncs (one round trip).
* What is not a statescale write sends no delta: an eviction under ``maxmemory``, a
  ``FLUSHDB``, a hand-typed ``DEL``. A copy is therefore re-read from Redis at least
  every ``touch_interval`` seconds, which bounds how long such a change can go unseen.

One instance per process and pool; thread-safe; a fork starts it afresh.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..session import Record
from ._breaker import Breaker

_HiredisReader: Any
try:  # hiredis parses a drained buffer in C; without it redis-py reads message by message
    from hiredis import Reader as _HiredisReader
except ImportError:  # pragma: no cover - the redis extra installs hiredis
    _HiredisReader = None

log = logging.getLogger("statescale")

#: What a pending read is marked with when nothing read in flight may be cached.
_NEWEST = 1 << 62

#: When no request has drained the subscription for this long (seconds), a background
#: thread does. It wakes on a timer, never per message: a thread woken for every change
#: cost a busy worker more CPU than the change itself.
IDLE_DRAIN = 0.05

#: A drain that reads this many bytes may have met a full socket with more held back;
#: the next lookup syncs first.
BACKLOG_BYTES = 1024

_PING = b"*1\r\n$4\r\nPING\r\n"


def encode_delta(
    set_fields: Mapping[str, bytes], deleted: Iterable[str], ttl_ms: int, created: float | None
) -> bytes:
    """The body of a delta (the script prefixes ``key\nversion\n``): NUL-separated
    ``ttl_ms``, ``created`` (empty for a change to an existing record), the number of
    deleted fields, those fields, then field/value pairs. Field names hold no NUL (the
    session refuses such keys) and values are JSON texts, which never do."""
    gone = [f.encode() for f in deleted]
    parts = [str(ttl_ms).encode(), b"" if created is None else repr(created).encode()]
    parts += [str(len(gone)).encode(), *gone]
    for field, value in set_fields.items():
        parts += (field.encode(), value)
    return b"\x00".join(parts)


class _Entry:
    __slots__ = ("created", "expires", "fields", "fresh_until", "version")

    def __init__(
        self, fields: dict[str, bytes], created: float, version: int, expires: float, fresh: float
    ) -> None:
        self.fields = fields
        self.created = created
        self.version = version
        self.expires = expires  # when Redis will expire it (the store's clock)
        self.fresh_until = fresh  # when to read it from Redis again regardless


class SessionCache:
    """Records by Redis key, kept current by the deltas on ``channel``."""

    def __init__(
        self,
        pool: Any,
        channel: str,
        *,
        max_entries: int,
        touch_interval: float,
        clock: Callable[[], float] = time.time,
        breaker: Breaker | None = None,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._breaker = breaker  # the store's: no catching up while Redis does not answer
        self.channel = channel
        self.max_entries = max_entries
        self.touch_interval = touch_interval
        self._lock = threading.RLock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._pending: dict[str, int] = {}  # key -> newest version seen while reading it
        self._sub: Any = None
        self._raw: Any = None  # the subscription's socket, read directly when hiredis is here
        self._reader: Any = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._last_drain = 0.0  # time.monotonic() of the last drain
        self._behind = False  # a drain met a backlog: sync before serving a copy
        self._pongs = 0
        self._last_drop = ""
        self._sync_timed_out = False

    # -- the subscription ------------------------------------------------------------
    def _forked(self) -> None:
        if self._pid != os.getpid():  # the parent's socket and copies are not ours
            self._pid = os.getpid()
            self._sub = None
            self._entries.clear()
            self._pending.clear()

    def _subscribe(self) -> None:
        """Subscribe, right after a read has shown that Redis answers (so a frozen
        Redis never costs a request a second timeout). What was read before the
        subscription existed is not cached: changes made meanwhile were not seen."""
        try:
            conn = self._pool.connection_class(**self._pool.connection_kwargs)
            conn.connect()
            conn.send_command("SUBSCRIBE", self.channel)
            conn.read_response()
        except (RedisError, OSError):
            return
        self._entries.clear()
        self._sub = conn
        self._raw = self._reader = None
        self._behind = False
        sock = getattr(conn, "_sock", None)
        if _HiredisReader is not None and sock is not None:
            # Messages that arrived with the SUBSCRIBE reply sit in redis-py's parser:
            # take those first, then read the socket ourselves, without blocking.
            while conn.can_read(timeout=0):
                self._on_message(conn.read_response())
            sock.setblocking(False)
            self._raw, self._reader = sock, _HiredisReader()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._idle_drainer, name="statescale-changes", daemon=True
            )
            self._thread.start()

    def _idle_drainer(self) -> None:
        """Drain when no request has for ``IDLE_DRAIN`` seconds."""
        while True:
            with self._lock:
                sub, pid = self._sub, self._pid
            if sub is None or pid != os.getpid():
                return
            wait = self._last_drain + IDLE_DRAIN - time.monotonic()
            if wait > 0:
                time.sleep(wait)
                continue
            with self._lock:
                if self._sub is sub:
                    self._drain()

    def _drop_subscription(self, why: str) -> None:
        self._last_drop = why
        sub, self._sub = self._sub, None
        self._raw = self._reader = None
        self._entries.clear()
        for key in self._pending:
            self._pending[key] = _NEWEST  # nothing read in flight may be cached
        if sub is not None:
            with contextlib.suppress(RedisError, OSError):
                sub.disconnect()
        log.warning("statescale: local session cache cleared: %s", why)

    def _drain(self) -> bool:
        """Apply the deltas that have arrived; False when no copy can be trusted."""
        self._forked()
        sub = self._sub
        if sub is None:
            return False
        self._last_drain = time.monotonic()
        try:
            if self._raw is not None:
                seen = self._drain_socket()
            else:
                seen = 0
                while sub.can_read(timeout=0):
                    self._on_message(sub.read_response())
                    seen += 128  # about a message's bytes
        except (RedisError, OSError, ValueError) as exc:
            self._drop_subscription(f"the subscription failed ({type(exc).__name__})")
            return False
        if seen >= BACKLOG_BYTES:
            self._behind = True
        return True

    def _catch_up(self) -> bool:
        """:meth:`_sync`, unless the store's breaker says Redis is not answering (then
        no copy can be trusted, and nothing waits for a timeout)."""
        if self._breaker is not None and self._breaker.open:
            return False
        if self._sync():
            return True
        if self._breaker is not None and self._sync_timed_out:
            self._breaker.tripped(self._last_drop)
        return False

    def _sync(self) -> bool:
        """Read every change published until now: send ``PING`` on the subscription and
        read up to its reply. False (the copies dropped) when that fails or times out."""
        sub, expected = self._sub, self._pongs + 1
        try:
            if self._raw is not None:
                timeout = sub.socket_timeout or 1.0
                deadline = time.monotonic() + timeout
                self._raw.sendall(_PING)
                while self._pongs < expected:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"no reply to PING within {timeout:g} s")
                    if not self._buffered():
                        select.select([self._raw], [], [], remaining)
                    self._drain_socket()
            else:
                sub.send_command("PING")
                while self._pongs < expected:
                    self._on_message(sub.read_response())
        except (RedisError, OSError, ValueError) as exc:
            self._sync_timed_out = isinstance(exc, (TimeoutError, RedisTimeoutError))
            self._drop_subscription(f"catching up failed ({type(exc).__name__}: {exc})")
            return False
        self._behind = False
        return True

    def _drain_socket(self) -> int:
        """One ``recv`` of all that has arrived (usually), parsed in C; the bytes read."""
        seen, reader = 0, self._reader
        while True:
            try:
                data = self._raw.recv(262144)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                break
            if not data:
                raise ConnectionResetError("Redis closed the subscription")
            reader.feed(data)
            seen += len(data)
            while (message := reader.gets()) is not False:
                self._on_message(message)
            if len(data) < 262144:
                break
        return seen

    def _buffered(self) -> bool:
        """Whether TLS holds decrypted bytes that ``select`` cannot see."""
        pending = getattr(self._raw, "pending", None)
        return pending is not None and pending() > 0

    def _on_message(self, message: Any) -> None:
        if isinstance(message, list):
            if message[0] == b"message":
                self._apply(message[2])
            elif message[0] == b"pong":
                self._pongs += 1

    def _apply(self, payload: bytes) -> None:
        key_raw, version_raw, body = payload.split(b"\n", 2)
        key = key_raw.decode()
        version = int(version_raw)
        if key in self._pending:
            self._pending[key] = max(self._pending[key], version)
        if version == 0:  # deleted
            self._entries.pop(key, None)
            return
        entry = self._entries.get(key)
        if entry is None:
            return
        if version <= entry.version:  # already in the copy (our own write, say)
            return
        if version != entry.version + 1:  # a delta went missing
            del self._entries[key]
            return
        parts = body.split(b"\x00")
        if parts[1]:  # a whole record under a key we hold: cannot be
            del self._entries[key]
            return
        gone = int(parts[2])
        fields = entry.fields
        for field in parts[3 : 3 + gone]:
            fields.pop(field.decode(), None)
        pairs = parts[3 + gone :]
        for i in range(0, len(pairs), 2):
            fields[pairs[i].decode()] = pairs[i + 1]
        entry.version = version
        entry.expires = self._clock() + int(parts[0]) / 1000

    # -- the cache -------------------------------------------------------------------
    def get(self, key: str, now: float, min_version: int = 0) -> Record | None:
        """The current record, or ``None``: then read from Redis and :meth:`fill`.
        A copy older than ``min_version`` (the client's own last write) is not served:
        the change may still be on its way here."""
        with self._lock:
            if not self._drain() or (self._behind and not self._catch_up()):
                return None
            entry = self._entries.get(key)
            if (
                entry is None
                or entry.version < min_version
                or now >= min(entry.fresh_until, entry.expires)
            ):
                return None
            self._entries.move_to_end(key)
            return Record(dict(entry.fields), entry.created)

    def expect(self, key: str) -> None:
        """Call before sending the read whose reply :meth:`fill` may cache."""
        with self._lock:
            self._pending[key] = 0

    def fill(self, key: str, record: Record | None, version: int, ttl_ms: int, now: float) -> None:
        """Cache what a read returned (record at ``version``), unless a newer change
        arrived while it was in flight."""
        with self._lock:
            if not self._drain():
                self._pending.pop(key, None)
                self._subscribe()
                return
            newer = self._pending.pop(key, _NEWEST)
            if record is None or newer > version or version <= 0:
                self._entries.pop(key, None)
                return
            self._put(key, record, version, ttl_ms=ttl_ms, now=now)

    def created(self, key: str, record: Record, version: int, ttl_ms: int, now: float) -> None:
        """This process just wrote a whole new record (deltas of keys not held are
        ignored, so its own would not bring it in)."""
        with self._lock:
            if self._drain():
                self._put(key, record, version, ttl_ms=ttl_ms, now=now)
            else:
                self._subscribe()

    def _put(self, key: str, record: Record, version: int, *, ttl_ms: int, now: float) -> None:
        entry = _Entry(
            dict(record.fields),
            record.created,
            version,
            now + ttl_ms / 1000,
            now + self.touch_interval,
        )
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def discard(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)
            if key in self._pending:
                self._pending[key] = _NEWEST

    def __len__(self) -> int:
        return len(self._entries)
