"""Owner-minted session IDs: a node mints only IDs that the ring in use maps to itself,
so a new session's first request and all its later ones reach the same node.

Each candidate is a fresh 256-bit ID from :mod:`secrets`; keeping those a ring sends to
one of N nodes spends about log2(N) bits, leaving far more than 128. It takes N tries
on average (about 1 µs each).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from ..exceptions import ConfigError, StateScaleError
from ..signing import new_session_id

MAX_TRIES = 100_000


class Routes(Protocol):
    """A ring as routers see it: node names, and the owner of a session ID."""

    @property
    def names(self) -> Collection[str]: ...

    def owner(self, key: str) -> str: ...


def owned_id_factory(
    ring: Routes, me: str, *, new_id: Callable[[], str] = new_session_id
) -> Callable[[], str]:
    """A session-ID factory for node ``me`` of ``ring``."""
    if me not in ring.names:
        raise ConfigError(f"node {me!r} is not on the ring ({sorted(ring.names)})")
    return following_id_factory(lambda: ring, me, new_id=new_id)


def following_id_factory(
    current: Callable[[], Routes],
    me: str,
    *,
    also: Sequence[tuple[Routes, str]] = (),
    new_id: Callable[[], str] = new_session_id,
) -> Callable[[], str]:
    """A session-ID factory for node ``me`` of a ring that changes (``current()`` gives
    it, as a registry's follower keeps it): IDs the ring in use at each call routes to
    ``me``, or plain random ones while ``me`` is not on it (while it joins or leaves,
    routers send it no new user anyway). ``also``: more rings and the node each must
    route the ID to (a node's own workers behind its router: two levels, N x M tries)."""
    fixed = [(ring.owner, name) for ring, name in also]

    def mint() -> str:
        ring = current()
        checks = [(ring.owner, me), *fixed] if me in ring.names else fixed
        for _ in range(MAX_TRIES):
            session_id = new_id()
            if all(owner(session_id) == name for owner, name in checks):
                return session_id
        raise StateScaleError(f"no ID owned by {me!r} in {MAX_TRIES} tries; check the ring")

    return mint
