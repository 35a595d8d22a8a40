"""URLs to redis-py clients that fail fast. Nothing connects until first used."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

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
#: What a Sentinel or Cluster URL's query may hold: redis-py's TLS options (with the
#: ``rediss+`` schemes), and the Sentinels' own credentials where they have any.
_TLS_OPTIONS = (
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_password",
    "ssl_cert_reqs",
    "ssl_check_hostname",
)
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")

#: Connection classes statescale may copy to open connections of its own.
_OWN_CONNECTIONS = (
    redis.Connection,
    redis.SSLConnection,
    redis.UnixDomainSocketConnection,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)


_PASSWORDS = re.compile(r"((?:^|&)(?:sentinel_|ssl_)?password=)[^&]*")


def redacted(url: str) -> str:
    """``url`` with its passwords starred (its own, and a ``sentinel_password`` or
    ``ssl_password`` in its query): fit for a log line or an error message."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hosts = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
    return urlunsplit(parts._replace(netloc=netloc, query=_PASSWORDS.sub(r"\1***", parts.query)))


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
      the master Sentinel names for SERVICE, found again after a failover; the URL's
      credentials are the master's, ``?sentinel_password=...`` (and
      ``sentinel_username``) the Sentinels' own where they require one;
    * ``redis+cluster://[[user]:password@]host:port[,host:port...]``: a Redis Cluster.

    ``rediss+sentinel://`` and ``rediss+cluster://`` speak TLS to every server (the
    Sentinels too), with redis-py's options in the query: ``ssl_ca_certs``,
    ``ssl_ca_path``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_password``,
    ``ssl_cert_reqs``, ``ssl_check_hostname`` (``true`` or ``false``).
    """
    parts = urlsplit(url)
    password = unquote(parts.password) if parts.password else None
    username = unquote(parts.username) if parts.username else None
    if parts.scheme in ("redis", "rediss", "unix"):
        return redis.Redis.from_url(url, **client_options(timeout, retries))
    scheme, tls = parts.scheme, parts.scheme.startswith("rediss+")
    if tls:
        scheme = "redis+" + scheme.partition("+")[2]
    if scheme not in (SENTINEL_SCHEME, CLUSTER_SCHEME):
        raise ConfigError(
            f"{redacted(url)!r}: unknown scheme {parts.scheme!r}; use redis://, rediss://, "
            f"unix://, {SENTINEL_SCHEME}://, {CLUSTER_SCHEME}:// (rediss+ for TLS)"
        )
    query = _query(url, parts.query, sentinel=scheme == SENTINEL_SCHEME, tls=tls)
    options = client_options(timeout, retries)
    secure: dict[str, Any] = {}
    if tls:
        secure = {"ssl": True, **{k: query[k] for k in _TLS_OPTIONS if k in query}}
        if "ssl_check_hostname" in secure:
            flag = _BOOLEANS.get(str(secure["ssl_check_hostname"]).lower())
            if flag is None:
                raise ConfigError(f"{redacted(url)!r}: ssl_check_hostname is true or false")
            secure["ssl_check_hostname"] = flag
    if scheme == SENTINEL_SCHEME:
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ConfigError(
                f"{redacted(url)!r}: name the Sentinel service: {SENTINEL_SCHEME}://h:26379/mymaster"
            )
        from redis.sentinel import Sentinel

        sentinels = {k.removeprefix("sentinel_"): query[k] for k in _SENTINEL_OPTIONS if k in query}
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            _hosts(parts.netloc, 26379),
            sentinel_kwargs={**options, **secure, **sentinels},
            **options,
        )
        db = int(path[1]) if len(path) > 1 else 0
        return sentinel.master_for(  # type: ignore[no-untyped-call]
            path[0], db=db, username=username, password=password, **secure
        )
    from redis.cluster import ClusterNode, RedisCluster

    hosts = _hosts(parts.netloc, 6379)
    nodes = [ClusterNode(host, port) for host, port in hosts]  # type: ignore[no-untyped-call]
    return LazyCluster(
        lambda: RedisCluster(
            startup_nodes=nodes,
            username=username,
            password=password,
            **options,
            **secure,
        )
    )


def _query(url: str, query: str, *, sentinel: bool, tls: bool) -> dict[str, str]:
    """A Sentinel or Cluster URL's options: only those it can take, each once."""
    allowed = (*(_TLS_OPTIONS if tls else ()), *(_SENTINEL_OPTIONS if sentinel else ()))
    found: dict[str, str] = {}
    for name, values in parse_qs(query, keep_blank_values=True).items():
        if name not in allowed or len(values) != 1:
            can = ", ".join(allowed) or "no option"
            raise ConfigError(f"{redacted(url)!r}: {name!r} is not an option here (it takes {can})")
        found[name] = values[0]
    return found


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
