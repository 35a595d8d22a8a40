"""Consistent hashing: the same owner for a key in every process. Pure.

:class:`Ring` is rendezvous (highest random weight) hashing with xxh3-64: each node
scores every key, the highest score owns it. Balance sits at the sampling-noise floor,
and adding or removing a node moves exactly the keys that node gains or loses. Weighted
with the logarithmic method (score = weight / -ln(u)). statescale's own routers use it.

:class:`NodeRing` is what every ring shares, the exact replicas of other balancers'
rings (:mod:`statescale.routing.balancers`) included: ``owner(key, down=())`` over named,
weighted nodes. A ring is an immutable value: ``with_node`` and ``without_node`` build
new ones. Never the builtin ``hash()`` (salted per process).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import xxhash

from ..exceptions import ConfigError

_TWO64 = float(1 << 64)


def _nodes(nodes: Mapping[str, float] | Iterable[str]) -> dict[str, float]:
    weights = dict(nodes) if isinstance(nodes, Mapping) else dict.fromkeys(nodes, 1.0)
    if not weights:
        raise ConfigError("a ring needs at least one node")
    for name, weight in weights.items():
        if not name or weight <= 0:
            raise ConfigError(f"node {name!r}: names must be non-empty and weights > 0")
    return weights


class NodeRing:
    """Named, weighted nodes; subclasses say which one owns a key."""

    def __init__(self, nodes: Mapping[str, float] | Iterable[str]) -> None:
        self.weights = _nodes(nodes)
        self.nodes = tuple(self.weights)

    @property
    def names(self) -> tuple[str, ...]:
        return self.nodes

    def with_node(self, name: str, weight: float = 1.0) -> NodeRing:
        return type(self)({**self.weights, name: weight})

    def without_node(self, name: str) -> NodeRing:
        return type(self)({k: v for k, v in self.weights.items() if k != name})

    def owner(self, key: str, down: Iterable[str] = ()) -> str:  # pragma: no cover
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, NodeRing)
            and type(other) is type(self)
            and other.weights == self.weights
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self.weights.items()))))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.weights!r})"


class Ring(NodeRing):
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
