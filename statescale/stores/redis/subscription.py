"""statescale's own Redis connections: the only module here with sockets and threads.

* :class:`Direct`: connections made like the client's (same address, credentials,
  timeouts and retry policy) that send a few commands in one round trip, packed in C,
  and read the replies straight off the socket with a hiredis reader of their own,
  without redis-py's per-command and per-reply machinery (about 200 Python calls a
  command, as much CPU as the round trip itself on a small machine).
* :class:`Tracking`: the same, plus this process's copies of the records it read,
  kept current by Redis's server-assisted client-side caching. Each connection is
  switched to ``CLIENT TRACKING ON REDIRECT <id> NOLOOP`` when it connects: Redis
  remembers the keys each one reads and, when any client changes, deletes, expires or
  evicts one, sends the key once to connection ``<id>``, this process's *subscription*
  to ``__redis__:invalidate`` (RESP2, so every Redis >= 6 and every proxy that passes
  pub/sub). ``NOLOOP``: a process's own writes do not come back to it. So a write costs
  Redis one message per process that holds a copy of that session, and nothing for the
  processes that do not: the cost does not grow with the fleet.
* :func:`pinger`: the breaker's short ``PING``.

When an invalidation is read, and why a copy served is current:

* Redis writes an invalidation to the subscription in the same event-loop pass in which
  it answers the writer, so it reaches this process's socket microseconds after the
  writer's reply; each lookup reads what has arrived first, without blocking. Only a
  request racing that window sees the state just before the change: a concurrent
  request of the same session (which has no order anyway) or a cookie replayed within
  microseconds of a logout. Read-your-writes is exact: see :mod:`.copies`.
* A drain that reads ``BACKLOG_BYTES`` or more may have met a full socket, with more
  held back in Redis; the next lookup first *syncs*: it sends ``PING`` on the
  subscription and reads up to the reply, which Redis queues behind every invalidation
  sent before it. A process that serves no request has its socket read every
  ``IDLE_DRAIN`` seconds by a background thread, so Redis never holds much for it.
* Redis tracks a key per connection, and forgets it when that connection closes: a
  connection that connects again (a lost socket, a restart, a failover) drops every
  copy, and so does a lost subscription; Redis cannot tell anyone of changes then.

One :class:`Tracking` per process and server; thread-safe; a fork starts afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import select
import ssl
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    InvalidResponse,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeout
from redis.retry import Retry

from ...session import Changes, Record
from .breaker import PROBE_TIMEOUT, Breaker
from .copies import Copies

_pack_command: Any
_Reader: Any
_parse_error: Any
try:  # how redis-py turns an error reply into its exception (a class method)
    from redis._parsers.base import BaseParser

    _parse_error = BaseParser.parse_error
except (ImportError, AttributeError):  # pragma: no cover - another redis-py
    _parse_error = None
try:  # packs a command and parses a drained buffer in C
    from hiredis import Reader as _Reader
    from hiredis import pack_command as _pack_command
except ImportError:  # pragma: no cover - the redis extra installs hiredis
    _pack_command = _Reader = None

log = logging.getLogger("statescale")

Command = Sequence[Any]

#: When no request has read the subscription for this long (seconds), a background
#: thread does. It wakes on a timer, never per message.
IDLE_DRAIN = 0.05

#: A drain that reads this many bytes may have met a full socket with more held back;
#: the next lookup syncs first.
BACKLOG_BYTES = 1024

#: Seconds a copy may be served after the ``PING`` (on the subscription) that Redis last
#: answered went out; past it, a lookup syncs before it serves one.
LEASE = 1.0
#: Seconds between the ``PING``s that renew the lease while lookups find copies.
HEARTBEAT = 0.25

INVALIDATIONS = "__redis__:invalidate"
_INVALIDATIONS = INVALIDATIONS.encode()
_PING = b"*1\r\n$4\r\nPING\r\n"


class Script:
    """A Lua script, sent by its SHA1 and loaded when the server does not know it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 - Redis's name


class Direct:
    """Connections of statescale's own from ``pool``'s recipe, taken and given back
    without a lock. Thread-safe; a fork starts afresh."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._idle: list[Any] = []
        self._pid = os.getpid()

    def _options(self, **extra: Any) -> dict[str, Any]:
        """The pool's recipe; RESP2 whatever the client speaks (the replies parsed
        here, and invalidations as pub/sub messages, are RESP2's)."""
        return {**self._pool.connection_kwargs, "protocol": 2, **extra}

    def _new(self) -> Any:
        return self._pool.connection_class(**self._options())

    def _here(self) -> None:
        """Notice a fork: the parent's connections are not ours. Also one that ran no
        at-fork hooks (a C ``fork()``, as uWSGI's workers are made unless
        ``py-call-osafterfork`` is set): :class:`Tracking` calls this before taking its
        lock, which the parent's thread may have held at the fork."""
        if self._pid != os.getpid():
            self._idle, self._pid = [], os.getpid()
            self._forked()

    def _take(self) -> Any:
        self._here()
        try:
            return self._idle.pop()
        except IndexError:
            return self._new()

    def _forked(self) -> None:
        """A fork was noticed."""

    def close(self) -> None:
        """Close the idle connections (one in use closes when given back)."""
        for conn in self._borrow_idle():
            conn.disconnect()

    def _borrow_idle(self) -> list[Any]:
        """The idle connections, held so that no thread uses one meanwhile (one given
        back meanwhile joins them: :meth:`_give_back` appends to the list it finds)."""
        idle, self._idle = self._idle, []
        return idle

    def call(self, *commands: Command) -> list[Any]:
        """Send ``commands`` in one round trip; their replies. An error reply raises
        (after every reply was read). A lost connection is retried as the client's
        policy says; a timeout is not."""
        conn = self._take()
        if _pack_command is not None:
            packed = [b"".join([_pack_command(tuple(c)) for c in commands])]
        else:  # pragma: no cover
            packed = conn.pack_commands(commands)
        try:
            return conn.retry.call_with_retry(  # type: ignore[no-any-return]
                lambda: _round_trip(conn, packed, len(commands)),
                lambda _error: conn.disconnect(),
            )
        finally:
            self._give_back(conn)

    def _give_back(self, conn: Any) -> None:
        self._idle.append(conn)  # disconnected on error; it reconnects when next used

    def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """``script`` with ``EVALSHA``, loaded first if the server lost it."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return self.call(command)[0]
        except NoScriptError:  # a restarted or flushed server: load it, once
            self.call(("SCRIPT", "LOAD", script.text))
            return self.call(command)[0]


def _round_trip(conn: Any, packed: list[bytes], replies: int) -> list[Any]:
    out: list[Any] = []
    error: ResponseError | None = None
    try:
        _connect(conn)
        if _Reader is not None:
            out = _exchange(conn, packed, replies)
        else:  # pragma: no cover - the redis extra installs hiredis
            conn.send_packed_command(packed, check_health=False)
            for _ in range(replies):
                try:
                    out.append(conn.read_response())
                except ResponseError as exc:
                    out.append(exc)
    except BaseException:
        # A reply that comes late must never be read as the next command's: some
        # connection classes (Sentinel's) stay open after a timeout unless told.
        conn.disconnect()
        raise
    for reply in out:  # raised after every reply was read: the connection stays in step
        if isinstance(reply, ResponseError):
            error = error or reply
    if error is not None:
        raise error
    return out


def _reply_error(message: str) -> Exception:
    """An error reply as redis-py's parsers make it: ``NOSCRIPT`` a ``NoScriptError``,
    ``READONLY`` a ``ReadOnlyError``, ``LOADING``, ``NOAUTH`` or "max number of clients"
    a ``ConnectionError`` (which the retry policy answers by connecting again), and so
    on; anything else a ``ResponseError``."""
    if _parse_error is not None:
        error: Exception = _parse_error(message)
        return error
    if message.startswith("NOSCRIPT"):  # pragma: no cover - redis-py without it
        return NoScriptError(message)
    return ResponseError(message)  # pragma: no cover


def _exchange(conn: Any, packed: list[bytes], replies: int) -> list[Any]:
    """Send ``packed`` on ``conn``'s socket and read ``replies`` replies, parsed by a
    hiredis reader of this connection's own: one ``sendall`` and, usually, one
    ``recv``, without redis-py's per-reply machinery (a third of a round trip's client
    CPU on a small machine). The socket keeps the client's timeouts; what fails is
    raised as redis-py's errors, so the retry policy treats it as it would redis-py's."""
    sock = conn._sock
    kept = getattr(conn, "statescale_reader", None)
    if kept is None or kept[0] is not sock:  # a new socket: nothing half-read on it
        reader = _Reader(replyError=_reply_error, protocolError=InvalidResponse)
        kept = conn.statescale_reader = (sock, reader)
    reader = kept[1]
    out: list[Any] = []
    try:
        sock.sendall(packed[0] if len(packed) == 1 else b"".join(packed))
        while len(out) < replies:
            reply = reader.gets()
            if reply is False:
                data = sock.recv(65536)
                if not data:
                    raise RedisConnectionError("Connection closed by server.")
                reader.feed(data)
            else:
                out.append(reply)
    except TimeoutError as exc:  # socket.timeout
        raise RedisTimeout(f"Timeout on the Redis connection: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise RedisConnectionError(f"Error on the Redis connection: {exc}") from exc
    for reply in out:
        if isinstance(reply, RedisConnectionError):  # the server is not serving: again
            raise reply
        if isinstance(reply, ReadOnlyError) and getattr(
            getattr(conn, "connection_pool", None), "is_master", False
        ):
            # As redis-py's Sentinel connections do: a master that answers READONLY has
            # been demoted; a lost connection makes the next one ask the Sentinels for
            # the new master (and the retry policy resend).
            raise RedisConnectionError("the previous master is now a replica")
    return out


def _after_fork(ref: weakref.ref[Tracking]) -> None:
    tracking = ref()
    if tracking is not None:
        tracking._forked()


def _connect(conn: Any) -> None:
    """Connect ``conn`` the way its class does. Sending on a closed connection would
    connect too, but to the address the connection holds, and a Sentinel-managed one
    holds no address until its own ``connect`` asks the Sentinels for the master's."""
    if getattr(conn, "_sock", None) is None:
        conn.connect()


class Tracking(Direct):
    """:class:`Direct` connections whose reads Redis tracks, and the copies they keep.

    The store asks :meth:`lookup` first; on a miss it takes a token with :meth:`begin`,
    sends its read or write with :meth:`call` or :meth:`run`, and reports the reply with
    :meth:`read`, :meth:`wrote` or :meth:`created`.
    """

    def __init__(self, pool: Any, copies: Copies, breaker: Breaker) -> None:
        super().__init__(pool)
        self.copies = copies
        self._breaker = breaker  # no catching up while Redis does not answer
        self._lock = threading.RLock()
        self._sub: Any = None
        self._raw: Any = None  # the subscription's socket, read directly with hiredis
        self._reader: Any = None
        self._id: int | None = None  # the subscription's client ID
        self.generation = 0  # bumped whenever the subscription is made or lost
        self._thread: threading.Thread | None = None
        self._last_drain = 0.0
        self._behind = False  # a drain met a backlog: sync before serving a copy
        self._poll: select.poll = select.poll()  # what _drain polls, and the descriptors
        self._polled: list[int] = []
        self._pongs = 0
        self._pings: deque[float] = deque()  # when each unanswered PING went out
        self._fresh_until = 0.0  # the lease: copies may be served until then (monotonic)
        self._next_beat = 0.0
        self._sync_timed_out = False
        self.last_drop = ""
        # A fork copies the lock as it stands, maybe held by the drainer thread, which
        # the child does not have: the child starts afresh before anything runs.
        this = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _after_fork(this))

    # -- connections -------------------------------------------------------------------
    def _new(self) -> Any:
        conn = self._pool.connection_class(**self._options(redis_connect_func=self._connected))
        conn.statescale_generation = None  # never connected
        return conn

    def _take(self) -> Any:
        conn = super()._take()
        generation = conn.statescale_generation
        if generation not in (None, self.generation) and not (generation == -1 and not self._id):
            # Its tracking points at a subscription that is gone, whose copies went
            # with it, or it connected untracked and there is a subscription now:
            # connect again, tracked by the current one. (Untracked while there is
            # still none, it serves on: a process that only writes connected anew
            # for every command, a TLS handshake each over rediss://.)
            conn.disconnect()
            conn.statescale_generation = None
        return conn

    def _connected(self, conn: Any) -> None:
        """redis-py's connect hook: the handshake, then tracking."""
        conn.on_connect()
        with self._lock:
            conn.statescale_generation, again = -1, conn.statescale_generation is not None
            if again:
                # Its tracked keys are gone, and the server may be another one (a
                # restart, a failover) where the subscription's ID names someone else's
                # client: subscribe afresh before anything is kept again.
                self._drop("a data connection connected again")
            if self._id is None:
                return  # not tracked; nothing read now is kept
            try:
                conn.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", self._id, "NOLOOP")
                conn.read_response()
            except ResponseError as exc:  # the subscription is gone (a failover, say)
                self._drop(f"tracking refused ({exc})")
                return
            conn.statescale_generation = self.generation

    def close(self) -> None:
        """Unsubscribe and close: no copy is served after this."""
        with self._lock:
            self._drop(None)
        super().close()

    def _give_back(self, conn: Any) -> None:
        if conn._sock is None and conn.statescale_generation is not None:
            with self._lock:  # failed and closed: its tracked keys went with it
                self._lost(conn)
        self._idle.append(conn)

    def _forked(self) -> None:
        self._lock = threading.RLock()
        self._idle, self._pid, self._thread = [], os.getpid(), None
        self._sub = self._raw = self._reader = self._id = None
        self._poll, self._polled = select.poll(), []
        self._pings, self._fresh_until = deque(), 0.0
        self.generation += 1
        self.copies.forget_all()

    # -- the copies ----------------------------------------------------------------------
    def lookup(self, key: str, min_version: int) -> Record | None:
        """The copy of ``key``, if one is current; else ``None``."""
        if self._pid != os.getpid():
            return None
        with self._lock:
            if not self._drain() or (self._behind and not self._catch_up()):
                return None
            record = self.copies.get(key, min_version)
            if record is None:
                return None
            now = time.monotonic()
            if now >= self._fresh_until:  # Redis has not answered lately: ask it first
                if not self._catch_up():
                    return None
                return self.copies.get(key, min_version)
            if now >= self._next_beat:
                self._beat(now)
            return record

    def begin(self, key: str) -> int:
        self._here()
        with self._lock:
            return self.copies.begin(key)

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
        """What a read returned (``wrote``: it slid the idle timeout, a write too)."""
        self._here()
        with self._lock:
            if self._current():
                self.copies.read(key, token, record, version, ttl_ms, wrote=wrote)
            else:
                self.abandon(key, token, wrote=wrote)
                self._subscribe()

    def abandon(self, key: str, token: int, *, wrote: bool = False) -> None:
        """What :meth:`begin` began failed: nothing is kept (and, Redis not having
        answered, nothing subscribes). A write that failed (``wrote``) may still have
        been applied, so it spoils what else is in flight for ``key``."""
        self._here()
        with self._lock:
            self.copies.read(key, token, None, 0, 0, wrote=wrote)

    def wrote(self, key: str, token: int, changes: Changes, version: int, ttl_ms: int) -> None:
        self._here()
        with self._lock:
            if self._current():
                self.copies.wrote(key, token, changes, version, ttl_ms)
            else:
                self.abandon(key, token, wrote=True)

    def created(self, key: str, token: int, record: Record, version: int, ttl_ms: int) -> None:
        self._here()
        with self._lock:
            if self._current():
                self.copies.read(key, token, record, version, ttl_ms, wrote=True)
            else:
                self.abandon(key, token, wrote=True)

    def drop(self, key: str) -> None:
        self._here()
        with self._lock:
            self.copies.drop(key)

    def drop_all(self) -> None:
        self._here()
        with self._lock:
            self.copies.invalidate(None)

    def _current(self) -> bool:
        """Whether invalidations arrive, as far as is known. No drain here: one that has
        not been read yet is read by the next lookup, which then drops the copy; what
        the token guards against is one read meanwhile (by another thread, or the idle
        drainer)."""
        return self._pid == os.getpid() and self._sub is not None

    # -- the subscription ------------------------------------------------------------
    def _subscribe(self) -> None:
        """Subscribe, right after a read has shown that Redis answers (so a frozen
        Redis never costs a request a second timeout)."""
        started = time.monotonic()
        try:
            conn = self._pool.connection_class(**self._options())
            conn.connect()
            conn.send_command("CLIENT", "ID")
            client_id = int(conn.read_response())
            conn.send_command("SUBSCRIBE", INVALIDATIONS)
            conn.read_response()
        except (RedisError, OSError, ValueError):
            return
        self.copies.invalidate(None)
        self.generation += 1
        self._sub, self._id = conn, client_id
        self._raw = self._reader = None
        self._behind = False
        self._pings.clear()
        self._fresh_until, self._next_beat = started + LEASE, started + HEARTBEAT
        sock = getattr(conn, "_sock", None)
        if _Reader is not None and sock is not None:
            # Messages that came with the SUBSCRIBE reply sit in redis-py's parser:
            # take those first, then read the socket ourselves, without blocking.
            while conn.can_read(timeout=0):
                self._on_message(conn.read_response())
            sock.setblocking(False)
            self._raw, self._reader = sock, _Reader()
        # (A drainer that stops clears it, under the lock; one an error ended does not.)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._idle_drainer, name="statescale-invalidations", daemon=True
            )
            self._thread.start()

    def _idle_drainer(self) -> None:
        """Drain when no request has for ``IDLE_DRAIN`` seconds; stop, under the lock,
        when there is no subscription: a subscription made after that starts another."""
        while True:
            with self._lock:
                sub = self._sub
                if self._pid != os.getpid():
                    return  # a forked copy of the thread's object: not this process's
                if sub is None:
                    self._thread = None
                    return
            wait = self._last_drain + IDLE_DRAIN - time.monotonic()
            if wait > 0:
                time.sleep(wait)
                continue
            with self._lock:
                if self._sub is sub:
                    self._drain()

    def _drop(self, why: str | None) -> None:
        """No invalidation can arrive any more: nothing here can be trusted. ``why``
        is logged (``None``: closed on purpose)."""
        self.last_drop = why or "closed"
        sub, self._sub = self._sub, None
        self._raw = self._reader = self._id = None
        self._pings.clear()
        self._fresh_until = 0.0
        self.generation += 1
        self.copies.invalidate(None)
        if sub is not None:
            with contextlib.suppress(RedisError, OSError):
                sub.disconnect()
            if why is not None:
                log.warning("statescale: local session copies cleared: %s", why)

    def _drain(self) -> bool:
        """Apply the invalidations that have arrived; False when no copy can be trusted.
        One ``select`` covers the subscription and the idle data connections: a data
        connection the server closed has taken its tracked keys with it."""
        sub = self._sub
        if sub is None:
            return False
        self._last_drain = time.monotonic()
        idle = self._borrow_idle()
        try:
            fds = [conn._sock.fileno() for conn in idle if conn._sock is not None]
            if self._raw is not None:
                fds.append(self._raw.fileno())
            ready = {fd for fd, _ in self._poller(fds).poll(0)}
            if self._raw is not None:
                raw_ready = self._raw.fileno() in ready or self._buffered()
                seen = self._drain_socket() if raw_ready else 0
            else:  # pragma: no cover - without hiredis
                seen = 0
                while sub.can_read(timeout=0):
                    self._on_message(sub.read_response())
                    seen += 64
            for conn in idle:
                if conn._sock is not None and conn._sock.fileno() in ready:
                    self._lost(conn)  # closed (no reply is due on an idle one)
                    break  # the subscription went with it
        except (RedisError, OSError, ValueError) as exc:
            self._drop(f"the invalidation subscription failed ({type(exc).__name__})")
            return False
        finally:
            self._idle.extend(idle)
        if seen >= BACKLOG_BYTES:
            self._behind = True
        return self._sub is not None

    def _poller(self, fds: list[int]) -> select.poll:
        """A poll object watching ``fds`` for input: the last one again when they are
        the same descriptors, as between most requests (a poll object holds numbers
        only, so one closed and reopened under the same number is watched alike).
        ``poll``, not ``select``: select() cannot watch descriptors past 1023."""
        if fds != self._polled:
            poller = select.poll()
            for fd in fds:
                poller.register(fd, select.POLLIN)
            self._poll, self._polled = poller, fds
        return self._poll

    def _lost(self, conn: Any) -> None:
        """A tracked data connection closed: what it read is no longer tracked, and
        the server may be gone too."""
        conn.disconnect()
        if conn.statescale_generation is not None:
            conn.statescale_generation = None
            self._drop("a data connection closed")

    def _catch_up(self) -> bool:
        """:meth:`_sync`, unless the breaker says Redis is not answering (then no copy
        can be trusted, and nothing waits for a timeout)."""
        if self._breaker.open:
            return False
        if self._sync():
            return True
        if self._sync_timed_out:
            self._breaker.tripped(self.last_drop)
        return False

    def _sync(self) -> bool:
        """Read every invalidation sent until now: ``PING`` on the subscription, and
        read up to its reply. False (the copies dropped) when that fails or times out."""
        sub, expected = self._sub, self._pongs + len(self._pings) + 1
        try:
            if self._raw is not None:
                timeout = sub.socket_timeout or 1.0
                deadline = time.monotonic() + timeout
                self._raw.sendall(_PING)
                self._pings.append(deadline - timeout)
                self._next_beat = deadline - timeout + HEARTBEAT  # this one renews it
                while self._pongs < expected:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"no reply to PING within {timeout:g} s")
                    if not self._buffered():
                        poller = select.poll()
                        poller.register(self._raw, select.POLLIN)
                        poller.poll(remaining * 1000)
                    self._drain_socket()
            else:  # pragma: no cover - without hiredis
                self._pings.append(time.monotonic())
                sub.send_command("PING")
                while self._pongs < expected:
                    self._on_message(sub.read_response())
        except (RedisError, OSError, ValueError) as exc:
            self._sync_timed_out = isinstance(exc, (TimeoutError, RedisTimeout))
            self._drop(f"catching up failed ({type(exc).__name__}: {exc})")
            return False
        self._behind = False
        return True

    def _beat(self, now: float) -> None:
        """A ``PING`` on the subscription, unless one is unanswered: its answer renews
        the lease. It is read by a later drain; nothing waits for it here."""
        self._next_beat = now + HEARTBEAT
        if self._pings or self._raw is None:
            return
        try:
            self._raw.sendall(_PING)
        except (OSError, ValueError) as exc:  # full, or broken: no PING half sent
            self._drop(f"the invalidation subscription failed ({type(exc).__name__})")
            return
        self._pings.append(now)

    def _drain_socket(self) -> int:
        """One ``recv`` of all that has arrived (usually), parsed in C; the bytes read.
        Over TLS, one ``recv`` returns one record at most, and Redis sends each message
        in a record of its own: read until there is nothing more."""
        seen, reader = 0, self._reader
        whole = not isinstance(self._raw, ssl.SSLSocket)  # a short read: all there is
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
            if whole and len(data) < 262144:
                break
        return seen

    def _buffered(self) -> bool:
        """Whether TLS holds decrypted bytes that ``select`` cannot see."""
        pending = getattr(self._raw, "pending", None)
        return pending is not None and pending() > 0

    def _on_message(self, message: Any) -> None:
        if not isinstance(message, list):
            return
        if message[0] == b"message" and message[1] == _INVALIDATIONS:
            keys = message[2]  # None: FLUSHALL, FLUSHDB, or Redis's table overflowed
            self.copies.invalidate(None if keys is None else [k.decode() for k in keys])
        elif message[0] == b"pong":
            self._pongs += 1
            if self._pings:  # every invalidation sent before that PING has been read
                self._fresh_until = self._pings.popleft() + LEASE


def pinger(pool: Any) -> Callable[[], bool]:
    """The breaker's probe: ``PING`` with a short timeout on a connection of its own."""
    options = {
        **pool.connection_kwargs,
        "protocol": 2,
        "socket_timeout": PROBE_TIMEOUT,
        "socket_connect_timeout": PROBE_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),
    }
    kept: list[Any] = []
    owner = [os.getpid()]

    def ping() -> bool:
        if owner[0] != os.getpid():  # forked: the parent's connection is not ours
            kept.clear()
            owner[0] = os.getpid()
        conn = kept.pop() if kept else pool.connection_class(**options)
        try:
            _connect(conn)
            conn.send_command("PING", check_health=False)
            conn.read_response()
        except (RedisError, OSError):
            conn.disconnect()  # a reply that comes later must not be read as the next
            return False
        kept.append(conn)
        return True

    return ping
