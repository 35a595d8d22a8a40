"""The one builder: :class:`~statescale.config.Settings` in, a store, a session-ID factory
and a middleware out. The Flask extension and every deployment path build through here.

A server that hosts the app may decide part of the settings for its processes: the
gunicorn hooks (:mod:`statescale.gunicorn`), in sticky mode, give each worker its node
name and the ring's members. They do so with :func:`host`, in the master before it
forks, so the workers inherit the :class:`Hosting`; nothing travels through the
environment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Settings
from .exceptions import ConfigError
from .middleware import StateScaleMiddleware
from .routing.backends import Backend
from .signing import new_session_id
from .stores.base import Store
from .stores.memory import MemoryStore

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

    from .handoff import RemotePeers
    from .routing.balancers import BackendRing
    from .routing.membership import Fleet

log = logging.getLogger("statescale")

NO_REDIS_URL = (
    "no Redis URL: set STATESCALE_REDIS_URL (redis://HOST:PORT/DB; see the README for "
    "Sentinel and Cluster URLs), or STATESCALE_EMBEDDED_REDIS=1 to start a private "
    "redis-server (development and demos only: it keeps nothing on disk)"
)


@dataclass(frozen=True)
class Hosting:
    """What the hosting server decided for this process; ``None`` keeps the setting."""

    node: str | None = None
    backends: tuple[Backend, ...] | None = None
    balancer: str | None = None
    #: Sticky mode under one master: the directory where this worker's slot hands its
    #: sessions from one worker to the next (:mod:`statescale.handoff`).
    handoff: Path | None = None
    #: A node of a fleet (``STATESCALE_NODE``) serving with several workers: its own
    #: router sends each session to one of them. This worker's slot and every slot (the
    #: second ring an ID this worker mints must route to it on); ``node`` and
    #: ``backends`` stay the fleet's.
    slot: str | None = None
    slots: tuple[Backend, ...] = ()
    #: A node that registered itself (``STATESCALE_REGISTRY``), as it did: the ring a
    #: worker forked after it has left starts from when it was the last of its fleet.
    member: Backend | None = None

    def apply(self, settings: Settings) -> Settings:
        if self.node is None and self.backends is None and self.balancer is None:
            return settings
        return replace(
            settings,
            node=settings.node if self.node is None else self.node,
            backends=settings.backends if self.backends is None else self.backends,
            balancer=settings.balancer if self.balancer is None else self.balancer,
        )


_hosting = Hosting()


def host(hosting: Hosting) -> None:
    """Set what the hosting server decided for this process (and the ones it forks)."""
    global _hosting
    _hosting = hosting


def hosted(settings: Settings) -> Settings:
    """``settings`` with what the hosting server decided applied over them."""
    return _hosting.apply(settings)


def build_store(settings: Settings) -> Store:
    """The store ``settings`` ask for. A Redis store needs ``redis_url``, or
    ``embedded_redis`` for this deployment's private server (:func:`embedded.shared`)."""
    idle, absolute, first = (
        settings.idle_timeout,
        settings.absolute_lifetime,
        settings.first_lifetime,
    )
    if settings.store_kind == "memory":
        memory = MemoryStore(
            max_sessions=settings.memory_sessions,
            idle_timeout=idle,
            absolute_lifetime=absolute,
            first_lifetime=first,
        )
        peers = _ring_peers(settings) if _hosting.handoff is None or _hosting.slot else None
        if _hosting.handoff is None and peers is None:
            return memory
        from .handoff import Handoff, HandoffStore

        keys = [k.encode() if isinstance(k, str) else k for k in settings.session.secret_keys]
        handoff = Handoff(
            memory,
            keys,
            directory=_hosting.handoff,
            peers=peers,
            slots=_handoff_slots(),
        )
        handoff.take_over()
        return HandoffStore(handoff)
    from .stores.redis import RedisStore

    url, private_to = settings.redis_url, None
    if url is None:
        if not settings.embedded_redis:
            raise ConfigError(NO_REDIS_URL)
        from . import embedded

        server = embedded.shared()
        url, private_to = server.url, server.owner_pid
    store = RedisStore.from_url(
        url,
        timeout=settings.redis_timeout,
        local_cache=settings.local_cache,
        idle_timeout=idle,
        absolute_lifetime=absolute,
        first_lifetime=first,
    )
    # A server this process started is this process's alone, unless it forks workers
    # after starting it (the gunicorn hooks, --preload): the store tells them apart.
    store.private_to = private_to
    return store


def _ring_peers(settings: Settings) -> RemotePeers | None:
    """A sticky node behind an outside balancer hands sessions to and from the other
    nodes of its ring (:class:`statescale.handoff.RemotePeers`)."""
    if settings.mode != "sticky" or settings.node is None:
        return None
    if settings.registry is None and len(settings.backends) < 2:
        return None
    from .handoff import RemotePeers

    return RemotePeers(node_fleet(settings), settings.node, cookie=settings.session.cookie.name)


def _slot_ring() -> tuple[BackendRing, str]:
    """This worker's node's own ring of worker slots, and this worker's slot."""
    from .routing.balancers import get

    assert _hosting.slot is not None
    return get("statescale").ring(_hosting.slots), _hosting.slot


def _handoff_slots() -> tuple[BackendRing, str] | None:
    """The ring of this worker's node's slots and this worker's, for its hand-overs:
    a node of a fleet's own, or under one master the workers' ring (none elsewhere)."""
    if _hosting.slot:
        return _slot_ring()
    if _hosting.handoff is None or _hosting.node is None or not _hosting.backends:
        return None
    from .routing.balancers import get

    return get("statescale").ring(_hosting.backends), _hosting.node


_fleets: dict[tuple[int, Settings], Fleet] = {}


def node_fleet(settings: Settings) -> Fleet:
    """This process's view of the ring ``settings`` put it on: fixed by
    ``STATESCALE_BACKENDS``, or following ``STATESCALE_REGISTRY`` from a thread of its
    own (started here, in the process that serves: after gunicorn's fork). One per
    process and settings: the IDs it mints and the peers it asks agree."""
    from .routing.membership import Fleet, Follower, RegistryUnavailable, open_registry

    key = (os.getpid(), settings)
    fleet = _fleets.get(key)
    if fleet is not None:
        return fleet
    if settings.registry is None:
        fleet = Fleet(settings.balancer, settings.backends)
    else:
        registry = open_registry(settings.registry)
        try:
            members = registry.members() or list(settings.backends)
        except RegistryUnavailable as exc:
            if not settings.backends:
                raise ConfigError(
                    f"{exc}; set STATESCALE_BACKENDS too, to start while it is down"
                ) from exc
            members = list(settings.backends)
        if not members and _hosting.member is not None:
            members = [_hosting.member]  # it has left, the last of its fleet: it drains
        if not members:
            raise ConfigError(
                f"{settings.registry} lists no node yet (not even {settings.node}): start "
                "this instance under gunicorn with statescale's hooks, which register it"
            )
        fleet = Fleet(settings.balancer, members)
        Follower(registry, fleet.follow).start()
    _fleets[key] = fleet
    return fleet


def ring_owner(settings: Settings) -> Callable[[str], str | None]:
    """Who owns a session ID on the ring this process routes by (``settings`` with the
    hosting server's decisions applied, as :func:`hosted` gives them); ``None`` where
    no ring routes (shared mode)."""
    if not settings.routed or settings.node is None:
        return lambda session_id: None
    fleet = node_fleet(settings)

    def owner(session_id: str) -> str:
        return fleet.ring.owner(session_id)  # the ring in use now: a registry changes it

    return owner


def build_id_factory(settings: Settings) -> Callable[[], str]:
    """How new session IDs are minted: at random, or, for a node of a sticky ring,
    only IDs that the balancer's ring in use routes back to it."""
    if settings.node is None:
        return new_session_id
    from .routing.minting import following_id_factory, owned_id_factory

    fleet = node_fleet(settings)
    if settings.registry is None and _hosting.slot is None:
        return owned_id_factory(fleet.ring, settings.node)
    also = [_slot_ring()] if _hosting.slot else []
    return following_id_factory(lambda: fleet.ring, settings.node, also=also)


def build_middleware(
    app: WSGIApplication, settings: Settings, *, store: Store | None = None
) -> StateScaleMiddleware:
    """``app`` wrapped in the middleware ``settings`` describe (with what the hosting
    server decided applied), on ``store`` if given, else the one they ask for."""
    settings = hosted(settings)
    if settings.development_secret:
        log.warning(
            "statescale: STATESCALE_SECRET_KEYS is not set; signing session cookies with "
            "a PUBLIC development key. Anyone can forge sessions. Set it in production."
        )
    session = settings.session
    return StateScaleMiddleware(
        app,
        store if store is not None else build_store(settings),
        secret_keys=session.secret_keys,
        cookie=session.cookie,
        max_size=session.max_size,
        locking=session.locking,
        # Affinity: the router sends a session's requests to one process, whose threads
        # must still take them one at a time (a read-modify-write would be lost).
        process_locking=settings.mode == "affinity",
        id_factory=build_id_factory(settings),
        sticky=settings.routed,
    )
