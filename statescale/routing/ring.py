"""Consistent hashing: the same owner for a key in every process. Pure.

Three rings with one interface, ``owner(key, down=())``:

* :class:`Ring`, rendezvous (highest random weight) hashing with xxh3-64: each node
  scores every key, the highest score owns it. Balance sits at the sampling-noise floor,
  and adding or removing a node moves exactly the keys that node gains or loses.
  Weighted with the logarithmic method (score = weight / -ln(u)).
* :class:`NginxRing`: ngx_http_upstream_hash_module's ``hash $key consistent``
  (nginx 1.22): for every server, ``160 * weight`` points, each the CRC32 of
  ``host \\0 port`` followed by the previous point (4 bytes, little-endian); points
  sorted, duplicates dropped; a key goes to the first point >= CRC32(key), wrapping.
* :class:`HAProxyRing`: HAProxy 2.6 ``hash-type consistent sdbm avalanche`` with the
  default ``hash-key id``: ``16 * weight`` nodes per server keyed
  ``full_hash(puid * 4096 + i)``; a key's hash is ``full_hash(sdbm(key))`` and the
  closer of the nodes just after and just before it wins (the one before on a tie).

A ring is an immutable value: ``with_node`` and ``without_node`` build new ones. Never
the builtin ``hash()`` (salted per process).
"""

from __future__ import annotations

import bisect
import math
import struct
import zlib
from collections.abc import Iterable, Mapping

import xxhash

from ..exceptions import ConfigError

_M32 = 0xFFFFFFFF
_TWO64 = float(1 << 64)


def routing_key(cookie_value: str) -> str:
    """What every router hashes: the session ID, the cookie value up to its first ``.``
    (the signature after it changes when keys rotate; the ID never does)."""
    return cookie_value.partition(".")[0]


def _nodes(nodes: Mapping[str, float] | Iterable[str]) -> dict[str, float]:
    weights = dict(nodes) if isinstance(nodes, Mapping) else dict.fromkeys(nodes, 1.0)
    if not weights:
        raise ConfigError("a ring needs at least one node")
    for name, weight in weights.items():
        if not name or weight <= 0:
            raise ConfigError(f"node {name!r}: names must be non-empty and weights > 0")
    return weights


class _Base:
    def __init__(self, nodes: Mapping[str, float] | Iterable[str]) -> None:
        self.weights = _nodes(nodes)
        self.nodes = tuple(self.weights)

    @property
    def names(self) -> tuple[str, ...]:
        return self.nodes

    def with_node(self, name: str, weight: float = 1.0) -> _Base:
        return type(self)({**self.weights, name: weight})

    def without_node(self, name: str) -> _Base:
        return type(self)({k: v for k, v in self.weights.items() if k != name})

    def owner(self, key: str, down: Iterable[str] = ()) -> str:  # pragma: no cover
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Base) and type(other) is type(self) and other.weights == self.weights
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self.weights.items()))))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.weights!r})"


class Ring(_Base):
    """Rendezvous hashing. ``owner(key)`` is the node with the highest score;
    ``ranking(key)`` all nodes, best first (where a key goes when its owner is down)."""

    def __init__(self, nodes: Mapping[str, float] | Iterable[str]) -> None:
        super().__init__(nodes)
        self._seeds = tuple(xxhash.xxh3_64_intdigest(name.encode()) for name in self.nodes)
        self._uniform = len(set(self.weights.values())) == 1
        self._table = tuple(zip(self._seeds, self.nodes, self.weights.values(), strict=True))

    def _score(self, data: bytes, seed: int, weight: float) -> float:
        h = xxhash.xxh3_64_intdigest(data, seed)
        if self._uniform:
            return float(h)
        return weight / -math.log((h + 0.5) / _TWO64)

    def owner(self, key: str, down: Iterable[str] = ()) -> str:
        data = key.encode()
        if self._uniform and not down:  # the hot path: one hash per node, no floats
            digest = xxhash.xxh3_64_intdigest
            best, owner = -1, self.nodes[0]
            for seed, name, _ in self._table:
                h = digest(data, seed)
                if h > best:
                    best, owner = h, name
            return owner
        return self.ranking(key, down)[0]

    def ranking(self, key: str, down: Iterable[str] = ()) -> list[str]:
        data, skip = key.encode(), set(down)
        scored = [
            (self._score(data, seed, weight), name)
            for seed, name, weight in self._table
            if name not in skip
        ]
        if not scored:
            raise LookupError("every node is down")
        return [name for _, name in sorted(scored, reverse=True)]


class NginxRing(_Base):
    """nginx ``hash $key consistent``. Node names are the ``server`` strings exactly as
    the configuration writes them (``127.0.0.1:8001``, ``unix:/path``); weights are
    integers."""

    POINTS_PER_WEIGHT = 160

    def __init__(self, nodes: Mapping[str, float] | Iterable[str]) -> None:
        super().__init__(nodes)
        points: dict[int, str] = {}
        pairs = []
        for server, weight in self.weights.items():
            base = self._base(server)
            prev = 0
            for _ in range(int(weight) * self.POINTS_PER_WEIGHT):
                prev = zlib.crc32(base + struct.pack("<I", prev))
                pairs.append((prev, server))
        # nginx sorts (qsort: the order of equal hashes is unspecified) and keeps the
        # first of equal ones; a tie between two servers is ~1e-4 likely for 5 servers.
        for point, server in sorted(pairs, key=lambda p: p[0]):
            points.setdefault(point, server)
        self._hashes = list(points)
        self._servers = list(points.values())

    @staticmethod
    def _base(server: str) -> bytes:
        raw = server.encode()
        if raw[:5].lower() == b"unix:":
            return raw[5:] + b"\x00"
        host, sep, port = raw.rpartition(b":")
        if sep and port.isdigit():
            return host + b"\x00" + port
        return raw + b"\x00"

    def owner(self, key: str, down: Iterable[str] = ()) -> str:
        skip = set(down)
        count = len(self._hashes)
        i = bisect.bisect_left(self._hashes, zlib.crc32(key.encode()))
        for tries in range(count):  # nginx gives up after 20 tries and falls back to RR
            server = self._servers[(i + tries) % count]
            if server not in skip:
                return server
        raise LookupError("every server is down")


def full_hash(a: int) -> int:
    """HAProxy's ``full_hash()``: Bob Jenkins' 32-bit avalanche, times 3221225473."""
    a = ((a + 0x7ED55D16) + (a << 12)) & _M32
    a = ((a ^ 0xC761C23C) ^ (a >> 19)) & _M32
    a = ((a + 0x165667B1) + (a << 5)) & _M32
    a = ((a + 0xD3A2646C) ^ (a << 9)) & _M32
    a = ((a + 0xFD7046C5) + (a << 3)) & _M32
    a = ((a ^ 0xB55A4F09) ^ (a >> 16)) & _M32
    return (a * 3221225473) & _M32


def sdbm(data: bytes) -> int:
    """HAProxy's ``hash_sdbm()``."""
    h = 0
    for c in data:
        h = (c + (h << 6) + (h << 16) - h) & _M32
    return h


class HAProxyRing(_Base):
    """HAProxy ``balance hash <expr>`` + ``hash-type consistent sdbm avalanche``. Node
    names are the servers in declaration order: server number n (from 1) has puid n,
    as HAProxy numbers servers without an explicit ``id``. Weights are integers."""

    WEIGHT_SCALE = 16  # BE_WEIGHT_SCALE
    EWGHT_RANGE = 256 * 16  # SRV_EWGHT_RANGE

    def __init__(self, nodes: Mapping[str, float] | Iterable[str]) -> None:
        super().__init__(nodes)
        keyed = []
        for puid, (server, weight) in enumerate(self.weights.items(), start=1):
            for node in range(int(weight) * self.WEIGHT_SCALE):
                keyed.append((full_hash(puid * self.EWGHT_RANGE + node), server))
        keyed.sort()
        self._keys = [k for k, _ in keyed]
        self._servers = [s for _, s in keyed]

    def key_hash(self, key: str) -> int:
        return full_hash(sdbm(key.encode()))

    def owner(self, key: str, down: Iterable[str] = ()) -> str:
        skip = set(down)
        keys, servers = self._keys, self._servers
        if skip:  # a server that is down has no nodes in HAProxy's tree
            pairs = [(k, s) for k, s in zip(keys, servers, strict=True) if s not in skip]
            if not pairs:
                raise LookupError("every server is down")
            keys, servers = [k for k, _ in pairs], [s for _, s in pairs]
        h = self.key_hash(key)
        nxt = bisect.bisect_left(keys, h)
        if nxt == len(keys):
            nxt = 0
        prv = nxt - 1  # -1 wraps to the last node, as eb32_last() does
        dp = (h - keys[prv]) & _M32
        dn = (keys[nxt] - h) & _M32
        return servers[prv] if dp <= dn else servers[nxt]
