"""Sessions in Redis, shared by every worker on every machine.

One Redis hash per session, under a key made from a hash of the session ID (someone who
can list the keys learns no usable ID), with the stores' creation-time field beside the
session's own fields. Round trips per request:

* load: ``HGETALL`` + ``PEXPIRE`` (the sliding idle timeout) in one pipeline;
* save: ``HDEL`` of the deleted keys + ``HSET`` of the set ones + ``PEXPIRE`` in one
  ``MULTI``/``EXEC``, so a failed write leaves the old state or the new, never a mix;
* a request that does not touch the session: none.

Timeouts are short on purpose: a dead or hung Redis must fail a request in about a
second (``StoreUnavailable``, which the middleware answers with 503), long before
gunicorn's worker timeout. redis-py retries once with a short backoff; statescale adds
no retries of its own. Nothing connects until the first request, so workers boot while
Redis is down and recover by themselves when it is back.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from ..exceptions import ConfigError, LockTimeout, StoreUnavailable
from ..session import Changes, Record
from .base import CREATED_FIELD, Lifetime

try:
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import RedisError, ResponseError
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - exercised by the import test
    raise ImportError(
        "statescale's Redis store needs redis-py: pip install 'statescale[redis]'"
    ) from exc

log = logging.getLogger("statescale")

_CREATED = CREATED_FIELD.encode()
SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"


def _key_hash(session_id: str) -> str:
    return hashlib.blake2b(session_id.encode(), digest_size=16).hexdigest()


def client_options(timeout: float, retries: int) -> dict[str, Any]:
    """redis-py options that fail fast: ``timeout`` per attempt, ``retries`` retries."""
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(ExponentialBackoff(cap=0.05, base=0.01), retries),
    }


def _hosts(netloc: str, default_port: int) -> list[tuple[str, int]]:
    hosts = []
    for part in netloc.rpartition("@")[2].split(","):
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
        hosts.append((host.strip("[]") or "localhost", int(port or default_port)))
    return hosts


def client_from_url(url: str, *, timeout: float = 0.4, retries: int = 1) -> Any:
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


class RedisStore:
    """The shared store. ``client`` is a redis-py client (``redis.Redis``, a Sentinel
    master, a ``RedisCluster``) or use :meth:`from_url`.

    ``lock_expiry`` bounds how long a crashed request can hold a session's lock;
    ``lock_wait`` how long another request waits for it before answering 503.
    """

    name = "redis"
    per_process = False

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "statescale:",
        idle_timeout: float = 1800.0,
        absolute_lifetime: float | None = 7 * 86400.0,
        lock_expiry: float = 10.0,
        lock_wait: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(client, str):
            raise ConfigError("RedisStore takes a client; for a URL use RedisStore.from_url(url)")
        self.client = client
        self.prefix = prefix
        self.lifetime = Lifetime(idle_timeout, absolute_lifetime)
        self.lock_expiry = lock_expiry
        self.lock_wait = lock_wait
        self._clock = clock
        self._cluster = type(client).__name__ in ("RedisCluster", "_LazyCluster")

    @classmethod
    def from_url(
        cls, url: str, *, timeout: float = 0.4, retries: int = 1, **options: Any
    ) -> RedisStore:
        """A store on the server at ``url`` (see :func:`client_from_url`)."""
        return cls(client_from_url(url, timeout=timeout, retries=retries), **options)

    def key(self, session_id: str) -> str:
        # The hash tag keeps a session's keys (record, lock) in one Cluster slot.
        return f"{self.prefix}{{{_key_hash(session_id)}}}"

    @contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        try:
            yield
        except RedisError as exc:
            raise StoreUnavailable("redis", f"{what}: {type(exc).__name__}: {exc}") from exc

    def load(self, session_id: str) -> Record | None:
        key = self.key(session_id)
        with self._translated("load"):
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(key)
            pipe.pexpire(key, int(self.lifetime.idle * 1000))
            try:
                raw = cast("dict[bytes, bytes]", pipe.execute()[0])
            except ResponseError as exc:
                if "WRONGTYPE" not in str(exc):
                    raise
                log.warning("statescale: session key %s is not a hash; dropped it", key)
                self.client.delete(key)
                return None
        return self._record(key, raw)

    def _record(self, key: str, raw: dict[bytes, bytes]) -> Record | None:
        stamp = raw.pop(_CREATED, None)
        if stamp is None:  # unknown, or a partial record left by a write after expiry
            return None
        try:
            created = float(stamp)
            fields = {k.decode(): v for k, v in raw.items()}
        except (ValueError, UnicodeDecodeError):
            log.warning("statescale: session key %s has an unreadable record; dropped it", key)
            return None
        if self.lifetime.remaining(created, self._clock()) <= 0:
            self.delete_key(key)
            return None
        return Record(fields, created)

    def _ttl_ms(self, created: float) -> int:
        return max(1, int(self.lifetime.remaining(created, self._clock()) * 1000))

    def save(self, session_id: str, changes: Changes, *, created: float) -> None:
        key = self.key(session_id)
        with self._translated("save"):
            pipe = self.client.pipeline(transaction=True)
            if changes.deleted:
                pipe.hdel(key, *changes.deleted)
            if changes.set:
                pipe.hset(key, mapping=dict(changes.set))
            pipe.pexpire(key, self._ttl_ms(created))
            pipe.execute()

    def create(
        self,
        session_id: str,
        fields: Mapping[str, bytes],
        *,
        created: float | None = None,
        replaces: str | None = None,
    ) -> float:
        created = self._clock() if created is None else created
        key = self.key(session_id)
        record: dict[str, bytes | str] = {**fields, CREATED_FIELD: repr(created)}
        with self._translated("create"):
            # Across Cluster slots MULTI is refused: write the new record, then drop the old.
            pipe = self.client.pipeline(transaction=not self._cluster)
            pipe.hset(key, mapping=record)
            pipe.pexpire(key, self._ttl_ms(created))
            if replaces is not None:
                pipe.delete(self.key(replaces))
            pipe.execute()
        return created

    def delete(self, session_id: str) -> None:
        self.delete_key(self.key(session_id))

    def delete_key(self, key: str) -> None:
        with self._translated("delete"):
            self.client.delete(key)

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
        try:
            yield
        finally:
            try:
                lock.release()
            except RedisError as exc:  # expired (held too long) or Redis went away
                log.warning("statescale: releasing a session lock failed: %s", exc)
