"""Sessions in Redis, shared by every worker on every machine.

One Redis hash per session (:mod:`.codec`), under a key made from a hash of the session
ID (someone who can list the keys learns no usable ID). Round trips per request:

* a request that does not touch the session: none;
* load: ``HGETALL`` with ``PEXPIRE`` (the sliding idle timeout) in one round trip; with
  per-process copies (``local_cache``), none at all while this process's copy is
  current, and ``HGETALL`` with ``PTTL`` when it is not;
* save: one Lua script that applies the deleted and set fields, bumps the version and
  sets the expiry, atomically (a failed write leaves the old state or the new, never a
  mix). The script is loaded again after ``SCRIPT FLUSH`` or a restart.

Copies (:mod:`.subscription`, :mod:`.copies`): each process keeps the records it has
read, and Redis tells it, and only it, when one of those changes. A write costs Redis
nothing for the processes that hold no copy, however many there are. On one server and
on Sentinel's master, and on each master of a Cluster (one subscription per master: Redis
tracks keys per server).

Timeouts are short on purpose: a dead or hung Redis must fail a request well under a
second (``StoreUnavailable``, which the middleware answers with 503), long before
gunicorn's worker timeout. A lost connection is retried once with a short backoff (every
write sets whole values, so a resent one does no harm); a timeout is not retried, and it
opens the store's breaker (:mod:`.breaker`), which fails the next requests at once until
a short ``PING`` is answered. Nothing connects until the first request, so workers boot
while Redis is down and recover by themselves when it is back.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

from redis.exceptions import AskError, MovedError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeout
from redis.sentinel import MasterNotFoundError

from ...config import (
    DEFAULT_ABSOLUTE_LIFETIME,
    DEFAULT_FIRST_LIFETIME,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_LOCAL_CACHE,
    DEFAULT_REDIS_TIMEOUT,
)
from ...exceptions import ConfigError, LockTimeout, StoreUnavailable
from ...session import Changes, Record, Written
from ..base import CREATED_FIELD, Lifetime
from . import codec
from .breaker import Breaker
from .client import client_from_url, is_cluster, own_connections
from .copies import Copies
from .subscription import Direct, Script, Tracking, pinger

log = logging.getLogger("statescale")

_WRITE = Script(codec.WRITE_SCRIPT)
_MAP_EVERY = 1.0  # seconds: a Cluster's slot map is read again at most this often


def _moved(exc: ResponseError) -> bool:
    """A Cluster redirection: the slot is served elsewhere (now, or for this key)."""
    return isinstance(exc, (MovedError, AskError)) or str(exc).startswith(("MOVED", "ASK"))


def _key_hash(session_id: str) -> str:
    return hashlib.blake2b(session_id.encode(), digest_size=16).hexdigest()


class RedisStore:
    """The shared store. ``client`` is a redis-py client (``redis.Redis``, a Sentinel
    master, a ``RedisCluster``), or use :meth:`from_url`.

    ``local_cache``: how many records each process keeps copies of (0: none; see the
    module's docstring). ``lock_expiry`` bounds how long a crashed request can hold a
    session's lock; ``lock_wait`` how long another request waits for it before 503.
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
        local_cache: int = 0,
        lock_expiry: float = 10.0,
        lock_wait: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(client, str):
            raise ConfigError("RedisStore takes a client; for a URL use RedisStore.from_url(url)")
        if local_cache < 0:
            raise ConfigError(f"local_cache must be >= 0 records, not {local_cache!r}")
        self.client = client
        self.prefix = prefix
        self.lifetime = Lifetime(idle_timeout, absolute_lifetime, first_lifetime)
        self.lock_expiry = lock_expiry
        self.lock_wait = lock_wait
        self._clock = clock
        self._cluster = is_cluster(client)
        #: The pid of the process whose private server this store talks to (an
        #: embedded Redis it started), or None for a server every process can reach.
        self.private_to: int | None = None
        pool = None if self._cluster else own_connections(client)
        #: Fails fast while Redis does not answer. A Cluster's masters each have one of
        #: their own (``_breakers``, by node name): one that hangs must not fail the
        #: sessions the others hold. This one is then for what reaches no master yet.
        self.breaker = Breaker(pinger(pool) if pool is not None else lambda: True)
        self._breakers: dict[str, Breaker] = {}
        #: How commands travel: this process's copies, statescale's own connections, or
        #: (a Cluster, a test double) the client's.
        self.tracking: Tracking | None = None
        self._direct: Direct | None = None
        self._local_cache = local_cache
        #: A Cluster's copies: one :class:`Tracking` per master, by node name (Redis
        #: tracks keys per server, and tells clients of that server only).
        self.shards: dict[str, Tracking] | None = {} if self._cluster and local_cache else None
        if pool is not None and local_cache > 0:
            self.tracking = self._direct = Tracking(pool, self._copies(), self.breaker)
        elif pool is not None:
            self._direct = Direct(pool)
        self._script: Any = None  # through the client (registered at the first write)
        self._map_lock = threading.Lock()
        self._next_map = 0.0  # when a Cluster's slot map may be read again (monotonic)

    def _copies(self) -> Copies:
        touch = min(10.0, self.lifetime.idle / 10)
        return Copies(max_entries=self._local_cache, touch_interval=touch, clock=self._clock)

    def _tracking(self, key: str) -> Tracking | None:
        """Where ``key``'s copies live: this process's one :class:`Tracking`, or on a
        Cluster the one of the master that holds ``key``'s slot."""
        if self.shards is None:
            return self.tracking
        with self._translated("route"):
            node = self.client.get_node_from_key(key)
            shard = self.shards.get(node.name)
            if shard is None:
                pool = self.client.get_redis_connection(node).connection_pool
                breaker = self._master_breaker(node)
                shard = self.shards.setdefault(node.name, Tracking(pool, self._copies(), breaker))
        return shard

    def _breaker(self, key: str | None) -> Breaker:
        """The breaker of the server that holds ``key``: on a Cluster, its master's
        (the store's own until the slot map is known)."""
        if not self._cluster or key is None:
            return self.breaker
        try:
            node = self.client.get_node_from_key(key)
        except (RedisError, RedisClusterException):  # no map yet: the Cluster is down
            return self.breaker
        return self._master_breaker(node)

    def _master_breaker(self, node: Any) -> Breaker:
        found = self._breakers.get(node.name)
        if found is None:
            ping = pinger(self.client.get_redis_connection(node).connection_pool)

            def probe() -> bool:
                # A replica may have taken the master's slots over: read the map again
                # (at most once a second), so that the next request for them goes to
                # the new master, whose breaker is closed, while this one stays open.
                self._read_map()
                return ping()

            found = self._breakers.setdefault(node.name, Breaker(probe))
        return found

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
        """A store on the server at ``url`` (see :func:`.client.client_from_url`)."""
        client = client_from_url(url, timeout=timeout, retries=retries)
        return cls(client, local_cache=local_cache, **options)

    def close(self) -> None:
        """Close statescale's own connections (and this process's copies with them);
        the store connects again if it is used after."""
        if self._direct is not None:
            self._direct.close()
        for shard in (self.shards or {}).values():
            shard.close()

    @property
    def per_process(self) -> bool:
        """Whether this process's sessions are its own: its private server, not one
        inherited from the process that forked it."""
        return self.private_to == os.getpid()

    def key(self, session_id: str) -> str:
        # The hash tag keeps a session's keys (record, lock) in one Cluster slot.
        return f"{self.prefix}{{{_key_hash(session_id)}}}"

    # -- sending -------------------------------------------------------------------------
    @contextmanager
    def _translated(self, what: str, key: str | None = None) -> Iterator[None]:
        """Redis's errors become ``StoreUnavailable``; a timeout opens the breaker (of
        the server that holds ``key``), which fails the next requests at once while that
        server does not answer."""
        breaker = self._breaker(key)
        breaker.guard(what)
        try:
            yield
        except (RedisError, RedisClusterException) as exc:  # (the latter: no RedisError)
            reason = f"{type(exc).__name__}: {exc}"
            # A Sentinel discovery that found no master has waited on every Sentinel
            # that did not answer (1.7 s each request, one stalled): fail fast as well.
            if isinstance(exc, (RedisTimeout, MasterNotFoundError)):
                breaker.tripped(reason)
            raise StoreUnavailable("redis", f"{what}: {reason}") from exc

    def _call(self, *commands: Sequence[Any], via: Direct | None = None) -> list[Any]:
        return cast(
            "list[Any]",
            self._send(via, lambda direct: direct.call(*commands), lambda: self._pipe(commands)),
        )

    def _pipe(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return cast("list[Any]", pipe.execute())

    def _write(self, keys: list[str], args: list[Any], via: Direct | None = None) -> int:
        return int(
            self._send(
                via,
                lambda direct: direct.run(_WRITE, keys, args),
                lambda: self._client_script()(keys, args),
            )
        )

    def _client_script(self) -> Any:
        """The write script, through the client (a Cluster's: registering it there
        connects, which must wait until a request is under :meth:`_translated`)."""
        if self._script is None:
            self._script = self.client.register_script(codec.WRITE_SCRIPT)
        return self._script

    def _send(
        self, via: Direct | None, direct: Callable[[Direct], Any], client: Callable[[], Any]
    ) -> Any:
        """On statescale's own connections (``via``, a Cluster master's, or this store's),
        else through the client; a Cluster slot that moved off ``via`` goes through the
        client too, which follows the redirection."""
        own = via or self._direct
        if own is None:
            return client()
        try:
            return direct(own)
        except ResponseError as exc:
            if own is self._direct or not _moved(exc):
                raise
            self._slot_moved(own)
        except (RedisConnectionError, RedisTimeout):
            if own is not self._direct:  # a Cluster master's: a failover may have moved on
                self._master_failed(own)
            raise
        return client()

    def _master_failed(self, shard: Direct) -> None:
        """A Cluster master's connections failed: its copies go, and the client reads
        the slot map again (once a second at most), so that once a replica takes over,
        the next request goes there. (The client would learn it only from an error of
        its own, and statescale's connections spare it every command.)"""
        if self.shards is not None:
            for name, held in list(self.shards.items()):
                if held is shard:
                    del self.shards[name]
                    held.close()
        self._read_map()

    def _read_map(self) -> None:
        """Read a Cluster's slot map again, at most once every ``_MAP_EVERY``."""
        now = time.monotonic()
        with self._map_lock:
            if now < self._next_map:
                return
            self._next_map = now + _MAP_EVERY
        with contextlib.suppress(RedisError, RedisClusterException):
            self.client.nodes_manager.initialize()

    def _slot_moved(self, shard: Direct) -> None:
        """A Cluster slot moved off ``shard``: the client follows it (and learns the new
        map); what ``shard`` read of it is no longer tracked there."""
        if isinstance(shard, Tracking):
            shard.drop_all()

    def _read(
        self, key: str, second: Sequence[Any], via: Direct | None = None
    ) -> tuple[Record | None, int, int]:
        """``HGETALL`` with ``second`` in one round trip: the record, its version, and
        the second command's reply."""
        try:
            raw, reply = self._call(("HGETALL", key), second, via=via)
        except ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            log.warning("statescale: session key %s is not a hash; dropped it", key)
            self._call(("DEL", key))
            return None, 0, -2
        if isinstance(raw, list):  # a client without hiredis's pairing: flat pairs
            raw = dict(zip(raw[::2], raw[1::2], strict=True))
        try:
            decoded = codec.decode(raw)
        except codec.Unreadable:
            log.warning("statescale: session key %s has an unreadable record; dropped it", key)
            return None, 0, int(reply)
        if decoded is None:
            return None, 0, int(reply)
        if self.lifetime.remaining(decoded.created, self._clock()) <= 0:
            self.delete_key(key)
            return None, 0, int(reply)
        return Record(decoded.fields, decoded.created), decoded.version, int(reply)

    def _ttl_ms(self, created: float, *, first: bool = False) -> int:
        remaining = self.lifetime.remaining(created, self._clock(), first=first)
        return max(1, int(remaining * 1000))

    # -- the Store protocol --------------------------------------------------------------
    def load(self, session_id: str, *, min_version: int = 0) -> Record | None:
        key = self.key(session_id)
        tracking = self._tracking(key)
        if tracking is None:
            with self._translated("load", key):
                return self._read(key, ("PEXPIRE", key, int(self.lifetime.idle * 1000)))[0]
        cached = tracking.lookup(key, min_version)
        if cached is not None and self.lifetime.remaining(cached.created, self._clock()) > 0:
            return cached
        token = tracking.begin(key)
        answered = touching = False
        try:
            with self._translated("load", key):
                record, version, pttl = self._read(key, ("PTTL", key), via=tracking)
                slide_below = (self.lifetime.idle - tracking.copies.touch_interval) * 1000
                if record is not None and pttl < slide_below:
                    touching = True
                    # A copy serves reads without touching Redis, so the idle timeout
                    # Redis keeps slides here, through the script (a write).
                    ttl_ms = self._ttl_ms(record.created)
                    touch = codec.write_args(codec.UPDATE, ttl_ms, {}, frozenset())
                    touched = self._write([key], touch, via=tracking)
                    if touched == 0:  # gone in between
                        record = None
                    # Keep the copy only if the touch came right after the read: a write
                    # in between (this process's own, which Redis does not echo) would
                    # leave the copy's fields behind its version.
                    version, pttl = (touched, ttl_ms) if touched == version + 1 else (0, 0)
            answered = True
        finally:
            if answered:
                tracking.read(key, token, record, version, pttl, wrote=touching)
            else:
                tracking.abandon(key, token, wrote=touching)
        return record

    def save(self, session_id: str, changes: Changes, *, created: float) -> int | None:
        key = self.key(session_id)
        ttl_ms = self._ttl_ms(created)
        args = codec.write_args(codec.UPDATE, ttl_ms, changes.set, changes.deleted)
        tracking = self._tracking(key)
        if tracking is None:
            with self._translated("save", key):
                version = self._write([key], args)
            return version or None
        token = tracking.begin(key)
        version = 0
        try:
            with self._translated("save", key):
                version = self._write([key], args, via=tracking)
        finally:
            if version:
                tracking.wrote(key, token, changes, version, ttl_ms)
            else:  # failed (maybe after Redis applied it), or no record: no copy either
                tracking.abandon(key, token, wrote=True)
        return version or None

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
        record = {**fields, CREATED_FIELD: codec.created_field(created)}
        args = codec.write_args(codec.CREATE, ttl_ms, record, frozenset())
        keys = [key]
        if replaces is not None and not self._cluster:
            keys.append(self.key(replaces))  # dropped in the same step
        tracking = self._tracking(key)
        token = tracking.begin(key) if tracking is not None else 0
        version = 0
        try:
            with self._translated("create", key):
                version = self._write(keys, args, via=tracking)
        finally:
            if tracking is not None:
                if version and not first:  # a new one is read from Redis on its return
                    tracking.created(key, token, Record(dict(fields), created), version, ttl_ms)
                elif version:  # Redis answers: subscribe now, so the return is kept
                    tracking.read(key, token, None, 0, 0, wrote=True)
                else:
                    tracking.abandon(key, token, wrote=True)
        if replaces is not None:
            if self._cluster:  # another slot: a step of its own
                self.delete(replaces)
            elif tracking is not None:
                tracking.drop(self.key(replaces))
        return Written(created, version)

    def delete(self, session_id: str) -> None:
        self.delete_key(self.key(session_id))

    def delete_key(self, key: str) -> None:
        tracking = self._tracking(key)
        if tracking is not None:
            tracking.drop(key)
        try:
            with self._translated("delete", key):
                self._call(("DEL", key), via=tracking)
        finally:  # and after: a read of this process in between may have kept it
            if tracking is not None:
                tracking.drop(key)

    @contextmanager
    def lock(self, session_id: str) -> Iterator[None]:
        with self._translated("lock", self.key(session_id)):  # (a Cluster connects here)
            lock = self.client.lock(
                self.key(session_id) + ":lock",
                timeout=self.lock_expiry,
                blocking_timeout=self.lock_wait,
                sleep=0.005,
                # Released where the response starts: another thread than the one that
                # took it when the view ran elsewhere (Flask's async views, on asgiref's).
                thread_local=False,
            )
            if not lock.acquire():
                raise LockTimeout(self.lock_wait)
        tracking = self._tracking(self.key(session_id))
        if tracking is not None:  # under the lock, read what Redis holds
            tracking.drop(self.key(session_id))
        try:
            yield
        finally:
            try:
                lock.release()
            except RedisError as exc:  # expired (held too long) or Redis went away
                log.warning("statescale: releasing a session lock failed: %s", exc)
