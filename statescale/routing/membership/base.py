"""What every registry does (:class:`Registry`), the error it raises when it cannot, and
the order members come in. :mod:`.registry` picks a registry by its URL.

A registry holds the fleet's live members, each a :class:`~..backends.Backend` (a
name, the address others reach it at, a weight):

* an instance :meth:`~Registry.register`\\ s itself and renews that with the same call
  well within ``ttl`` seconds; one that stops renewing (a crash) drops out when the TTL
  runs out;
* :meth:`~Registry.deregister` removes it at once, but only its own entry: ``token``
  tells one registration from the next, so the old master of a ``USR2`` upgrade, stopping,
  does not remove the name the new master has just registered;
* :meth:`~Registry.watch` blocks, calling ``changed(members)`` with the membership
  first and again after each change, woken by the registry's own notices (a Redis
  channel, an etcd watch), not by a polling loop.

Members come sorted by name, so every follower builds the same ring; of two at one
address, only the first.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from ...exceptions import StateScaleError
from ..backends import Backend

log = logging.getLogger("statescale")

Changed = Callable[[list[Backend]], object]  # (what it returns is ignored)


class RegistryUnavailable(StateScaleError):
    """The registry could not be reached or refused a call; the caller retries."""


class Replaced(RegistryUnavailable):
    """This instance's entry was taken over, with another weight, at its own address:
    a ``USR2`` upgrade's new master, whose registration stands."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"{name!r} was registered again at this address with another weight (a USR2 "
            "upgrade's new master): not taken back"
        )


class NameTaken(RegistryUnavailable):
    """Another live instance is registered under this name at another address."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"another instance is registered as {name!r} at another address; "
            "give each instance its own STATESCALE_NODE"
        )


class Registry(Protocol):
    """A membership registry (Redis, etcd or a static file)."""

    url: str

    def members(self) -> list[Backend]:
        """The live members, sorted by name."""

    def register(self, backend: Backend, *, ttl: float, token: str, renewal: bool = False) -> None:
        """Add ``backend`` for ``ttl`` seconds, or renew it (``renewal``). A first
        registration takes over a live entry of the same name at the same address (a
        ``USR2`` upgrade's new master); a renewal whose entry was so taken over with
        another weight raises :class:`Replaced` rather than take it back."""

    def deregister(self, name: str, *, token: str) -> None:
        """Remove ``name``, if the entry is still the one ``token`` registered."""

    def watch(self, changed: Changed, stop: threading.Event) -> None:
        """Call ``changed`` with the members, then after every change, until ``stop``
        is set (within about a second) or the registry fails (:class:`RegistryUnavailable`)."""

    def close(self) -> None: ...


def sort(members: Sequence[Backend]) -> list[Backend]:
    """A registry's members in the order every reader agrees on (by name); of two at
    one address (an instance renamed before its old entry expired), the first only:
    nginx's ring is keyed by address, and one instance must not weigh twice."""
    kept: dict[str, Backend] = {}
    for member in sorted(members, key=lambda b: b.name):
        other = kept.setdefault(member.address, member)
        if other is not member:
            log.warning(
                "statescale: the registry holds %s and %s at one address %s; following %s",
                other.name, member.name, member.address, other.name,
            )  # fmt: skip
    return list(kept.values())
