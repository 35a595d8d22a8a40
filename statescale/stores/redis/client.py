"""URLs to redis-py clients that fail fast. Nothing connects until first used."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

from ...config import DEFAULT_REDIS_TIMEOUT
from ...exceptions import ConfigError

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"

#: Connection classes statescale may copy to open connections of its own.
_OWN_CONNECTIONS = (
    redis.Connection,
    redis.SSLConnection,
    redis.UnixDomainSocketConnection,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)


def client_options(timeout: float, retries: int) -> dict[str, Any]:
    """redis-py options that fail fast: ``timeout`` per attempt, ``retries`` retries."""
    return {
        "protocol": 2,  # plain replies; invalidations arrive as RESP2 pub/sub messages
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
        return LazyCluster(
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


class LazyCluster:
    """RedisCluster connects in its constructor; defer that to the first command. A
    Cluster it cannot reach then is a ``ConnectionError`` (a 503, tried again at the
    next command), not redis-py's ``RedisClusterException``, which is no ``RedisError``."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._client: Any = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    try:
                        self._client = self._factory()
                    except RedisClusterException as exc:
                        raise RedisConnectionError(str(exc)) from exc
        return getattr(self._client, name)


def is_cluster(client: Any) -> bool:
    return isinstance(client, LazyCluster) or type(client).__name__ == "RedisCluster"


def own_connections(client: Any) -> Any:
    """The pool whose recipe statescale may copy for connections of its own: one server
    (or Sentinel's current master) reached through redis-py's own connection classes.
    ``None`` for anything else (a Cluster, a test double): then statescale sends every
    command through ``client``."""
    pool = getattr(client, "connection_pool", None)
    if (
        isinstance(client, redis.Redis)
        and getattr(pool, "connection_class", None) in _OWN_CONNECTIONS
    ):
        return pool
    return None
