"""Sessions in Redis, shared by every worker on every machine.

One Redis hash per session, under a key made from a hash of the session ID (someone who
can list the keys learns no usable ID), holding the session's fields beside two of the
store's own: the creation time and a version. Round trips per request:

* a request that does not touch the session: none;
* load: ``HGETALL`` with ``PEXPIRE`` (the sliding idle timeout) in one pipeline; with
  the per-process cache (below), none at all while this process's copy is current, and
  ``PTTL`` with ``HGETALL`` when it is not;
* save: one Lua script that applies the deleted and set fields, bumps the version, sets
  the expiry and publishes the change, atomically (a failed write leaves the old state
  or the new, never a mix). The script is re-loaded after ``SCRIPT FLUSH`` or a
  restart. On a single server it is sent by :class:`_DirectScript`, which skips
  redis-py's command machinery (about 200 Python calls a command, as much CPU as the
  round trip itself on a small machine).

``from_url`` turns on the per-process cache (:mod:`statescale.stores._cache`): each
process keeps copies of the sessions it has read and applies every published change to
them, so a worker that reads a session again needs no round trip and a read-modify-write
needs one. ``local_cache=0`` turns it off; every store publishes its changes either way,
so processes with and without the cache can share one Redis.

Timeouts are short on purpose: a dead or hung Redis must fail a request well under a
second (``StoreUnavailable``, which the middleware answers with 503), long before
gunicorn's worker timeout. redis-py retries a lost connection once with a short backoff
(every write sets whole values, so a resent one does no harm); a timeout is not retried,
and it opens the store's breaker (:mod:`statescale.stores._breaker`), which fails the
next requests at once until a short ``PING`` is answered.
Nothing connects until the first request, so workers boot while Redis is down and
recover by themselves when it is back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from ..config import (
    DEFAULT_ABSOLUTE_LIFETIME,
    DEFAULT_FIRST_LIFETIME,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_LOCAL_CACHE,
    DEFAULT_REDIS_TIMEOUT,
)
from ..exceptions import ConfigError, LockTimeout, StoreUnavailable
from ..session import Changes, Record, Written
from ._breaker import PROBE_TIMEOUT, Breaker
from ._cache import SessionCache, encode_delta
from .base import CREATED_FIELD, Lifetime

try:
    import redis
    from redis.backoff import ExponentialBackoff, NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import NoScriptError, RedisError, ResponseError
    from redis.exceptions import TimeoutError as RedisTimeout
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - exercised by the import test
    raise ImportError(
        "statescale's Redis store needs redis-py: pip install 'statescale[redis]'"
    ) from exc

log = logging.getLogger("statescale")

_pack_command: Any
try:  # packs a command in C; redis-py's own packer checks each argument in Python
    from hiredis import pack_command as _pack_command
except ImportError:  # pragma: no cover - the redis extra installs hiredis
    _pack_command = None

_CREATED = CREATED_FIELD.encode()
VERSION_FIELD = "\x00v"
_VERSION = VERSION_FIELD.encode()

# KEYS[1]: the session; KEYS[2] (optional): a session to delete in the same step.
# ARGV: mode ('u' updates an existing record, 'c' creates one afresh), expiry in ms,
# channel, delta body, the number of fields to delete, those fields, then field/value
# pairs to set. Returns the record's new version (>= 1), or 0 when 'u' finds no record:
# then it writes nothing and tells every process to drop its copy.
WRITE_SCRIPT = """
local key = KEYS[1]
if ARGV[1] == 'u' then
  if redis.call('EXISTS', key) == 0 then
    redis.call('PUBLISH', ARGV[3], key .. '\\n0\\n')
    return 0
  end
else
  redis.call('DEL', key)
end
local n = tonumber(ARGV[5])
if n > 0 then redis.call('HDEL', key, unpack(ARGV, 6, 5 + n)) end
if #ARGV > 5 + n then redis.call('HSET', key, unpack(ARGV, 6 + n, #ARGV)) end
local v = redis.call('HINCRBY', key, '\\0v', 1)
redis.call('PEXPIRE', key, ARGV[2])
redis.call('PUBLISH', ARGV[3], key .. '\\n' .. v .. '\\n' .. ARGV[4])
if KEYS[2] then
  redis.call('DEL', KEYS[2])
  redis.call('PUBLISH', ARGV[3], KEYS[2] .. '\\n0\\n')
end
return v
"""
DELETE_SCRIPT = """
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], KEYS[1] .. '\\n0\\n')
return 1
"""
SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"


def _key_hash(session_id: str) -> str:
    return hashlib.blake2b(session_id.encode(), digest_size=16).hexdigest()


def client_options(timeout: float, retries: int) -> dict[str, Any]:
    """redis-py options that fail fast: ``timeout`` per attempt, ``retries`` retries."""
    return {
        "protocol": 2,  # plain replies; the tracking cache reads RESP2 pub/sub messages
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # A lost connection is retried (a pooled one the server closed, say); a timeout
        # is not: a server that did not answer in time will not answer a resend sooner.
        "retry": Retry(
            ExponentialBackoff(cap=0.05, base=0.01),
            retries,
            supported_errors=(RedisConnectionError,),
        ),
    }


def _hosts(netloc: str, default_port: int) -> list[tuple[str, int]]:
    hosts = []
    for part in netloc.rpartition("@")[2].split(","):
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
        hosts.append((host.strip("[]") or "localhost", int(port or default_port)))
    return hosts


def client_from_url(url: str, *, timeout: float = DEFAULT_REDIS_TIMEOUT, retries: int = 1) -> Any:
    """A redis-py client for ``url``. Nothing connects until it is first used.

    * ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS),
      ``unix:///path/to/redis.sock[?db=0]``: one server;
    * ``redis+sentinel://[[user]:password@]host:port[,host:port...]/SERVICE[/db]``:
      the master Sentinel names for SERVICE, found again after a failover;
    * ``redis+cluster://[[user]:password@]host:port[,host:port...]``: a Redis Cluster.
    """
    parts = urlsplit(url)
    password = unquote(parts.password) if parts.password else None
    username = unquote(parts.username) if parts.username else None
    if parts.scheme in ("redis", "rediss", "unix"):
        return redis.Redis.from_url(url, **client_options(timeout, retries))
    if parts.scheme == SENTINEL_SCHEME:
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ConfigError(
                f"{url!r}: name the Sentinel service: {SENTINEL_SCHEME}://h:26379/mymaster"
            )
        from redis.sentinel import Sentinel

        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            _hosts(parts.netloc, 26379),
            sentinel_kwargs=client_options(timeout, retries),
            **client_options(timeout, retries),
        )
        db = int(path[1]) if len(path) > 1 else 0
        return sentinel.master_for(  # type: ignore[no-untyped-call]
            path[0], db=db, username=username, password=password
        )
    if parts.scheme == CLUSTER_SCHEME:
        from redis.cluster import ClusterNode, RedisCluster

        hosts = _hosts(parts.netloc, 6379)
        nodes = [ClusterNode(host, port) for host, port in hosts]  # type: ignore[no-untyped-call]
        return _LazyCluster(
            lambda: RedisCluster(
                startup_nodes=nodes,
                username=username,
                password=password,
                **client_options(timeout, retries),
            )
        )
    raise ConfigError(
        f"{url!r}: unknown scheme {parts.scheme!r}; use redis://, rediss://, unix://, "
        f"{SENTINEL_SCHEME}:// or {CLUSTER_SCHEME}://"
    )


def _is_sentinel(client: Any) -> bool:
    return type(client.connection_pool).__name__ == "SentinelConnectionPool"


class _LazyCluster:
    """RedisCluster connects in its constructor; defer that to the first command."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._client: Any = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._factory()
        return getattr(self._client, name)


class _DirectScript:
    """A Lua script run with ``EVALSHA`` on connections of its own, made like the
    client's (same address, credentials, timeouts and retry policy), taken and given back
    without a lock. Thread-safe; a fork starts afresh. Only for a single server: Sentinel
    and Cluster clients keep redis-py's ``Script``, which knows where to send it."""

    def __init__(self, client: Any, script: str) -> None:
        self._client = client
        self._pool = client.connection_pool
        self._script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()  # noqa: S324 - Redis's name
        self._idle: list[Any] = []
        self._pid = os.getpid()

    def __call__(self, keys: list[str], args: list[Any]) -> Any:
        if self._pid != os.getpid():  # the parent's connections are not ours
            self._idle, self._pid = [], os.getpid()
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = self._pool.connection_class(**self._pool.connection_kwargs)
        command = ("EVALSHA", self.sha, len(keys), *keys, *args)
        packed = [_pack_command(command)] if _pack_command else conn.pack_command(*command)
        try:
            try:
                return self._send(conn, packed)
            except NoScriptError:  # a restarted or flushed server: load it, once
                self._client.script_load(self._script)
                return self._send(conn, packed)
        finally:
            self._idle.append(conn)  # disconnected on error; it reconnects when next used

    @staticmethod
    def _send(conn: Any, packed: list[bytes]) -> Any:
        def once() -> Any:
            conn.send_packed_command(packed, check_health=False)
            return conn.read_response()

        return conn.retry.call_with_retry(once, lambda _error: conn.disconnect())


def _single_server(client: Any) -> bool:
    """Whether ``client`` talks to one server through redis-py's own connection classes
    (so statescale may open connections of its own like the client's)."""
    pool = getattr(client, "connection_pool", None)
    return (
        isinstance(client, redis.Redis)
        and not _is_sentinel(client)
        and pool is not None
        and pool.connection_class
        in (redis.Connection, redis.SSLConnection, redis.UnixDomainSocketConnection)
    )


def _script(client: Any, script: str) -> Callable[[list[str], list[Any]], Any]:
    """``script`` registered with ``client``: direct on a single server, else redis-py's
    ``Script``."""
    if _single_server(client):
        return _DirectScript(client, script)
    return cast("Callable[[list[str], list[Any]], Any]", client.register_script(script))


def _pinger(client: Any) -> Callable[[], bool]:
    """The breaker's probe: ``PING`` with a short timeout on a connection of its own, on
    a single server; elsewhere the next real command is the probe."""
    if not _single_server(client):
        return lambda: True
    pool = client.connection_pool
    options = {
        **pool.connection_kwargs,
        "socket_timeout": PROBE_TIMEOUT,
        "socket_connect_timeout": PROBE_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),
    }
    kept: list[Any] = []

    def ping() -> bool:
        conn = kept.pop() if kept else pool.connection_class(**options)
        try:
            conn.send_command("PING", check_health=False)
            conn.read_response()
        except (RedisError, OSError):
            conn.disconnect()  # a reply that comes later must not be read as the next
            return False
        kept.append(conn)
        return True

    return ping


class RedisStore:
    """The shared store. ``client`` is a redis-py client (``redis.Redis``, a Sentinel
    master, a ``RedisCluster``) or use :meth:`from_url`.

    ``lock_expiry`` bounds how long a crashed request can hold a session's lock;
    ``lock_wait`` how long another request waits for it before answering 503.
    """

    name = "redis"

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "statescale:",
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        absolute_lifetime: float | None = DEFAULT_ABSOLUTE_LIFETIME,
        first_lifetime: float = DEFAULT_FIRST_LIFETIME,
        lock_expiry: float = 10.0,
        lock_wait: float = 5.0,
        clock: Callable[[], float] = time.time,
        cache: SessionCache | None = None,
    ) -> None:
        if isinstance(client, str):
            raise ConfigError("RedisStore takes a client; for a URL use RedisStore.from_url(url)")
        self.client = client
        self.prefix = prefix
        self.lifetime = Lifetime(idle_timeout, absolute_lifetime, first_lifetime)
        self.lock_expiry = lock_expiry
        self.lock_wait = lock_wait
        self._clock = clock
        self._cluster = type(client).__name__ in ("RedisCluster", "_LazyCluster")
        self.cache = cache
        #: The pid of the process whose private server this store talks to (an
        #: embedded Redis it started), or None for a server every process can reach.
        self.private_to: int | None = None
        self.channel = f"{prefix}changes"
        self._write = _script(client, WRITE_SCRIPT)
        self._delete = _script(client, DELETE_SCRIPT)
        self.breaker = Breaker(_pinger(client))

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = DEFAULT_REDIS_TIMEOUT,
        retries: int = 1,
        local_cache: int = DEFAULT_LOCAL_CACHE,
        **options: Any,
    ) -> RedisStore:
        """A store on the server at ``url`` (see :func:`client_from_url`).

        ``local_cache``: how many records each process may cache (0: none). Only for a
        single server (``redis://``, ``rediss://``, ``unix://``); Sentinel and Cluster
        URLs always read from Redis.
        """
        client = client_from_url(url, timeout=timeout, retries=retries)
        store = cls(client, **options)
        if local_cache > 0 and isinstance(client, redis.Redis) and not _is_sentinel(client):
            store.cache = SessionCache(
                client.connection_pool,
                store.channel,
                max_entries=local_cache,
                touch_interval=min(10.0, store.lifetime.idle / 10),
                clock=store._clock,
                breaker=store.breaker,
            )
        return store

    @property
    def per_process(self) -> bool:
        """Whether this process's sessions are its own: its private server, not one
        inherited from the process that forked it."""
        return self.private_to == os.getpid()

    def key(self, session_id: str) -> str:
        # The hash tag keeps a session's keys (record, lock) in one Cluster slot.
        return f"{self.prefix}{{{_key_hash(session_id)}}}"

    @contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        """Redis's errors become ``StoreUnavailable``; a timeout opens the breaker, which
        fails the next requests at once while Redis does not answer."""
        self.breaker.guard(what)
        try:
            yield
        except RedisError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, RedisTimeout):
                self.breaker.tripped(reason)
            raise StoreUnavailable("redis", f"{what}: {reason}") from exc

    def load(self, session_id: str, *, min_version: int = 0) -> Record | None:
        key = self.key(session_id)
        cache = self.cache
        if cache is None:
            with self._translated("load"):
                pipe = self.client.pipeline(transaction=False)
                pipe.hgetall(key)
                pipe.pexpire(key, int(self.lifetime.idle * 1000))
                raw, _ = self._execute_read(pipe, key)
            return self._record(key, raw)[0]
        now = self._clock()
        cached = cache.get(key, now, min_version)
        if cached is not None and self.lifetime.remaining(cached.created, now) > 0:
            return cached
        with self._translated("load"):
            cache.expect(key)
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(key)
            pipe.pttl(key)
            raw, pttl = self._execute_read(pipe, key)
            record, version = self._record(key, raw)
            if record is not None and pttl < (self.lifetime.idle - cache.touch_interval) * 1000:
                # Slide the idle timeout through the script, which tells the other
                # processes too (a bare PEXPIRE would leave their copies' expiry behind).
                ttl_ms = self._ttl_ms(record.created)
                args = self._write_args("u", ttl_ms, {}, frozenset(), None)
                version = int(self._write([key], args))
                pttl = ttl_ms
        cache.fill(key, record, version, int(pttl), now)
        return record

    def _execute_read(self, pipe: Any, key: str) -> tuple[dict[bytes, bytes], int]:
        try:
            raw, ttl = pipe.execute()
        except ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            log.warning("statescale: session key %s is not a hash; dropped it", key)
            self.client.delete(key)
            return {}, -2
        return cast("dict[bytes, bytes]", raw), int(ttl)

    def _record(self, key: str, raw: dict[bytes, bytes]) -> tuple[Record | None, int]:
        """The session in a ``HGETALL`` reply, and its version (0 if none)."""
        stamp = raw.pop(_CREATED, None)
        version = raw.pop(_VERSION, b"0")
        if stamp is None:  # unknown, or a partial record
            return None, 0
        try:
            created = float(stamp)
            fields = {k.decode(): v for k, v in raw.items()}
            number = int(version)
        except (ValueError, UnicodeDecodeError):
            log.warning("statescale: session key %s has an unreadable record; dropped it", key)
            return None, 0
        if self.lifetime.remaining(created, self._clock()) <= 0:
            self.delete_key(key)
            return None, 0
        return Record(fields, created), number

    def _ttl_ms(self, created: float, *, first: bool = False) -> int:
        remaining = self.lifetime.remaining(created, self._clock(), first=first)
        return max(1, int(remaining * 1000))

    def _write_args(
        self,
        mode: str,
        ttl_ms: int,
        fields: Mapping[str, bytes],
        deleted: frozenset[str],
        created: float | None,
    ) -> list[Any]:
        body = encode_delta(fields, deleted, ttl_ms, created)
        args: list[Any] = [mode, ttl_ms, self.channel, body, len(deleted), *deleted]
        for field, value in fields.items():
            args += (field, value)
        return args

    def save(self, session_id: str, changes: Changes, *, created: float) -> int | None:
        key = self.key(session_id)
        ttl_ms = self._ttl_ms(created)
        args = self._write_args("u", ttl_ms, changes.set, changes.deleted, None)
        with self._translated("save"):
            # This process's copy follows through the published change, like everyone's.
            version = int(self._write([key], args))
        if version == 0:  # gone: the script told every process to drop its copy
            if self.cache is not None:
                self.cache.discard(key)
            return None
        return version

    def create(
        self,
        session_id: str,
        fields: Mapping[str, bytes],
        *,
        created: float | None = None,
        replaces: str | None = None,
    ) -> Written:
        created = self._clock() if created is None else created
        key = self.key(session_id)
        # A new session lives for the first lifetime only; the first load of it (its
        # client's return) finds the short TTL and slides it to the idle timeout.
        first = replaces is None
        ttl_ms = self._ttl_ms(created, first=first)
        record = {**fields, CREATED_FIELD: repr(created).encode()}
        args = self._write_args("c", ttl_ms, record, frozenset(), created)
        keys = [key]
        if replaces is not None and not self._cluster:
            keys.append(self.key(replaces))  # dropped in the same step
        with self._translated("create"):
            version = int(self._write(keys, args))
        if replaces is not None and self._cluster:  # another slot: a step of its own
            self.delete(replaces)
        if self.cache is not None and not first:  # a new one is read from Redis on return
            self.cache.created(key, Record(dict(fields), created), version, ttl_ms, self._clock())
        return Written(created, version)

    def delete(self, session_id: str) -> None:
        self.delete_key(self.key(session_id))

    def delete_key(self, key: str) -> None:
        if self.cache is not None:
            self.cache.discard(key)
        with self._translated("delete"):
            self._delete([key], [self.channel])

    @contextmanager
    def lock(self, session_id: str) -> Iterator[None]:
        lock = self.client.lock(
            self.key(session_id) + ":lock",
            timeout=self.lock_expiry,
            blocking_timeout=self.lock_wait,
            sleep=0.005,
        )
        with self._translated("lock"):
            if not lock.acquire():
                raise LockTimeout(self.lock_wait)
        if self.cache is not None:  # under the lock, read what Redis holds
            self.cache.discard(self.key(session_id))
        try:
            yield
        finally:
            try:
                lock.release()
            except RedisError as exc:  # expired (held too long) or Redis went away
                log.warning("statescale: releasing a session lock failed: %s", exc)
