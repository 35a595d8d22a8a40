"""A node's view of the fleet: the ring it routes and mints by, and the rings before it,
which say where a session was before the last changes. Pure; the clock is injected.

A membership change moves some sessions to a new owner. Their previous owner, on the
ring before the change, is where the new owner asks for them (the hand-over of
:mod:`statescale.handoff`), so a :class:`Fleet` keeps each ring it replaces for
``keep`` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ..backends import Backend
from ..balancers import BackendRing
from ..balancers import get as get_balancer

#: Seconds a replaced ring is remembered: longer than the slowest router takes to follow
#: a change, and than a session's users take to come back after one, in most fleets.
KEEP = 600.0
MAX_PREVIOUS = 8


class Fleet:
    """The current ring of ``balancer`` over the members, and the ones it replaced."""

    def __init__(
        self,
        balancer: str,
        members: Sequence[Backend],
        *,
        keep: float = KEEP,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._balancer = get_balancer(balancer)
        self._keep = keep
        self._clock = clock
        self.ring: BackendRing = self._balancer.ring(members)
        self._previous: list[tuple[float, BackendRing]] = []  # (replaced at, ring), newest first
        #: Called with the node names of each new ring (a node's hand-over listens).
        self.listeners: list[Callable[[tuple[str, ...]], None]] = []

    def update(self, members: Sequence[Backend]) -> bool:
        """Route by ``members`` from now on; False (nothing changes) if they are the
        current ones, or none (a fleet of nobody routes nowhere: keep the last one)."""
        if not members:
            return False
        ring = self._balancer.ring(members)
        if ring.backends == self.ring.backends:  # (as the balancer can serve them)
            return False
        self._previous.insert(0, (self._clock(), self.ring))
        del self._previous[MAX_PREVIOUS:]
        self.ring = ring  # one assignment: readers see the old ring or the new one
        return True

    def follow(self, members: list[Backend]) -> None:
        """:meth:`update`, as a :class:`~.follow.Follower` calls it; then tell the
        listeners."""
        if self.update(members):
            for listener in self.listeners:
                listener(self.ring.names)

    @property
    def previous(self) -> list[BackendRing]:
        """The rings replaced within ``keep`` seconds, newest first."""
        now = self._clock()
        return [ring for at, ring in self._previous if now - at < self._keep]

    def address(self, name: str) -> tuple[str, int] | None:
        """Where node ``name`` is (or was, if it left lately)."""
        for ring in (self.ring, *self.previous):
            for backend in ring.backends:
                if backend.name == name:
                    return backend.host, backend.port
        return None
