"""Peer-to-peer balancing: an httpx transport that sends each request with a session
cookie straight to the session's owner, on the ring the nodes mint by. No balancer in
between (the ``client`` extra installs httpx)::

    import httpx
    from statescale.client import StickyTransport

    with httpx.Client(
        transport=StickyTransport(registry="redis://10.0.0.5:6379/0"),
        base_url="https://statescale",  # Secure cookies go to https URLs only
    ) as client:
        client.post("/api/incr?key=n")  # no cookie yet: round robin; the answer sets one
        client.post("/api/incr?key=n")  # to the node that minted it

* Membership comes from a registry (``registry=URL``, followed from a thread: changes
  apply within a second or two; one that loses more than half the nodes at once, in
  3 s) or a fixed list (``backends=["a=10.0.0.1:8000", ...]``).
* The session is read from the request's ``Cookie`` header (``cookie``, the nodes'
  cookie name); the router's rule: the ID before the signature, hashed on ``balancer``'s
  ring (the nodes' ``STATESCALE_BALANCER``).
* A node whose connection cannot be made (refused, unreachable, or not accepted within
  the client's connect timeout: nothing was sent) is skipped for ``retry_after``
  seconds, and the request goes to the session's next owner on the ring, as
  statescale's router does. Other errors (a read timeout, a reset mid-request) are
  raised: the request may have run.
* The request's URL keeps its scheme and host for ``Host`` and for the client's cookie
  jar (so a Secure cookie needs an ``https://`` base URL, and a cookie Domain the
  nodes set must match its host); only the connection goes to the node, over
  ``scheme`` (``http`` by default: the nodes' own port, inside the fleet's network;
  ``https`` where the nodes serve TLS).
* With ``balancer="nginx"`` the ring hashes each node's address as text: spell the
  ``backends`` as the nodes' own list does (a registry spells them for everyone).
* Following a Redis registry runs its read script, which drops expired entries: the
  client's Redis user needs ``EVALSHA``, ``TIME``, ``HGETALL``, ``HDEL``, ``PUBLISH``
  and ``SUBSCRIBE`` on the registry's keys, as the nodes' does.
* A transport made before a fork follows the registry afresh in the child.

:class:`AsyncStickyTransport` is the same for ``httpx.AsyncClient``; it waits for the
registry's first membership at its first requests, without blocking the event loop or
taking a thread, not in its constructor.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .cookies import cookie_value
from .exceptions import ConfigError
from .routing.backends import Backend, check
from .routing.balancers import BackendRing
from .routing.balancers import get as get_balancer
from .signing import DEFAULT_COOKIE_NAME, routing_key

try:
    import httpx
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError("StickyTransport needs httpx: pip install 'statescale[client]'") from exc

RETRY_AFTER = 1.0  # seconds a node that refused a connection is skipped
FIRST_MEMBERSHIP = 10.0  # seconds to wait for a registry's first membership
_POLL = 0.02  # seconds between looks at it, in an event loop
SCHEMES = ("http", "https")
#: What fails before a byte of the request is sent: the next owner may take it.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)


class _Fork:
    """The lock under which the first thread of a forked child to use a transport
    makes it the child's own; made anew in each child, where no thread holds it."""

    lock = threading.Lock()


def _renew_fork_lock() -> None:
    _Fork.lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_fork_lock)


def _misconfigured(exc: BaseException) -> bool:
    """Whether a failed connection was TLS refusing the node's certificate (it does not
    verify, or names another host): a configuration to fix, not a node to skip, so it
    is raised. Any other TLS failure (a node that closes at once: it is stopping) is a
    node to fail over from."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _Routes:
    """The ring, who is skipped, and the round robin: what both transports share."""

    def __init__(
        self,
        *,
        registry: str | None,
        backends: Sequence[Backend | str] | None,
        cookie: str,
        balancer: str,
        retry_after: float,
    ) -> None:
        if (registry is None) == (backends is None):
            raise ConfigError("give StickyTransport registry=URL or backends=[...], not both")
        self.cookie = cookie
        self.retry_after = retry_after
        self.registry = registry
        self._balancer = get_balancer(balancer)
        self._down: dict[str, float] = {}  # node -> until when it is skipped
        self._lock = threading.Lock()
        self.follower: Any = None
        self._pid = os.getpid()
        self.routing = False  # whether there is a ring (``current``) to route by
        self.current: tuple[BackendRing, Iterator[str]]
        if backends is not None:
            parsed = [b if isinstance(b, Backend) else Backend.parse(b) for b in backends]
            self._use(check(parsed))
            return
        self._start_following()

    def _start_following(self) -> None:
        from .routing.membership import Follower, open_registry

        self.follower = Follower(open_registry(self.registry or ""), self._follow).start()

    def ready(self) -> None:
        """Return once there is a ring to route by: at once with ``backends``; with a
        registry, once its first membership has come (``ConfigError`` if it does not
        within ``FIRST_MEMBERSHIP`` seconds, saying why)."""
        if self.routing or self.follower.wait(bool, FIRST_MEMBERSHIP):
            return
        self._unready()

    async def ready_async(self) -> None:
        """:meth:`ready` for an event loop: it polls, so however many requests wait,
        none takes a thread."""
        deadline = time.monotonic() + FIRST_MEMBERSHIP
        while not self.routing and time.monotonic() < deadline:
            await asyncio.sleep(_POLL)
        if not self.routing:
            self._unready()

    def _unready(self) -> None:
        why = self.follower.last_error  # (it goes on following: a later request may route)
        if why is not None:
            raise ConfigError(f"{self.registry}: the registry cannot be read: {why}")
        raise ConfigError(f"{self.registry}: no node registered within {FIRST_MEMBERSHIP:g} s")

    @property
    def forked(self) -> bool:
        """Whether this is a child of the process that made these routes."""
        return self._pid != os.getpid()

    def adopt(self, renew: Callable[[], None]) -> None:
        """In a child of a fork, once, by whichever thread comes first while the others
        wait: ``renew`` what else the parent's process held (the transport's pool), and
        follow the registry afresh (the parent's thread is not in this process)."""
        if not self.forked:
            return
        with _Fork.lock:
            if not self.forked:
                return  # another thread did it
            renew()
            self._lock = threading.Lock()
            if self.follower is not None:
                self._start_following()
            self._pid = os.getpid()  # last: a thread that sees it finds all the rest done

    def _follow(self, members: list[Backend]) -> None:
        if members:
            self._use(members)

    def _use(self, members: list[Backend]) -> None:
        ring = self._balancer.ring(members)
        # Each transport starts its round robin at a random node, so that many clients'
        # first requests (their new sessions) spread over the fleet.
        start = random.randrange(len(ring.names))
        names = ring.names[start:] + ring.names[:start]
        self.current = (ring, itertools.cycle(names))  # one assignment: one snapshot
        self.routing = True

    def targets(self, request: httpx.Request) -> Iterator[Backend]:
        """Where to send ``request``: its session's owner, then each next owner (round
        robin for a request without a session), skipping nodes that refused lately."""
        ring, cycle = self.current
        by_name = {b.name: b for b in ring.backends}
        key = self._session(request)
        now = time.monotonic()
        with self._lock:
            skipped = [n for n, until in self._down.items() if until > now and n in by_name]
        tried: list[str] = []
        for down in (skipped, []):  # all skipped nodes refused lately: try them again
            while True:
                try:
                    name = self._pick(ring, cycle, key, [*down, *tried])
                except LookupError:
                    break
                tried.append(name)
                yield by_name[name]

    def _pick(
        self, ring: BackendRing, cycle: Iterator[str], key: str | None, down: list[str]
    ) -> str:
        if key is not None:
            return ring.owner(key, down)
        with self._lock:  # (itertools.cycle is not safe to share between threads)
            for _ in range(len(ring.names)):
                name = next(cycle)
                if name not in down:
                    return name
        raise LookupError("every node is down")

    def _session(self, request: httpx.Request) -> str | None:
        """The session ID to route by, read as the routers read it (the first value
        of the cookie's name that has the shape of a signed ID)."""
        lines = request.headers.get_list("cookie")
        if not lines:
            return None
        # Several lines: joined as gunicorn joins them, so read as the nodes read them.
        value = cookie_value(", ".join(lines).encode("latin-1", "replace"), self.cookie.encode())
        return routing_key(value) if value is not None else None

    def refused(self, node: Backend) -> None:
        now = time.monotonic()
        with self._lock:  # (nodes come and go: only those skipped now are kept)
            self._down = {name: until for name, until in self._down.items() if until > now}
            self._down[node.name] = now + self.retry_after

    def close(self, *, wait: bool = True) -> None:
        if self.follower is not None:
            self.follower.stop(wait=wait)


def _to(request: httpx.Request, node: Backend, scheme: str) -> httpx.Request:
    """``request`` sent to ``node``: a new request, so the client's own keeps its URL.
    Over https, TLS names the request's host (SNI, and the name its certificate must
    carry), not the node's address."""
    url = request.url.copy_with(scheme=scheme, host=node.host, port=node.port)
    extensions = dict(request.extensions)
    if scheme == "https":
        extensions.setdefault("sni_hostname", request.url.host)
    return httpx.Request(
        request.method,
        url,
        headers=request.headers,
        stream=request.stream,
        extensions=extensions,
    )


class _Sticky:
    """What both transports take: the membership (``registry`` or ``backends``), the
    nodes' cookie name and ``balancer``, how long a refusing node is skipped, the
    ``scheme`` the nodes serve, and the httpx transport that carries the requests
    (default: a new pooled one)."""

    def __init__(
        self,
        *,
        registry: str | None = None,
        backends: Sequence[Backend | str] | None = None,
        cookie: str = DEFAULT_COOKIE_NAME,
        balancer: str = "statescale",
        retry_after: float = RETRY_AFTER,
        scheme: str = "http",
        transport: Any = None,
    ) -> None:
        if scheme not in SCHEMES:
            raise ConfigError(f"scheme must be one of {SCHEMES}, not {scheme!r}")
        self.scheme = scheme
        self.routes = _Routes(
            registry=registry,
            backends=backends,
            cookie=cookie,
            balancer=balancer,
            retry_after=retry_after,
        )
        self._own_carrier = transport is None
        self._transport = transport or self._carrier()

    def _carrier(self) -> Any:
        raise NotImplementedError

    def _renew_carrier(self) -> None:
        """In a forked child: a pool of its own. The parent's keep-alive sockets are the
        parent's too, and a reply read here could answer another process's request."""
        if self._own_carrier:
            self._transport = self._carrier()


class StickyTransport(_Sticky, httpx.BaseTransport):
    """Sends each request to its session's owner (see the module's docstring)."""

    _transport: httpx.BaseTransport

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        try:
            self.routes.ready()  # a registry's first membership: fail here, not later
        except ConfigError:
            self.routes.close(wait=False)
            raise

    def _carrier(self) -> httpx.BaseTransport:
        return httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.routes.adopt(self._renew_carrier)
        self.routes.ready()
        refused: httpx.TransportError | None = None
        for node in self.routes.targets(request):
            try:
                return self._transport.handle_request(_to(request, node, self.scheme))
            except _NOT_SENT as exc:
                if _misconfigured(exc):
                    raise
                self.routes.refused(node)
                refused = exc
        raise refused or httpx.ConnectError("no node to send the request to", request=request)

    def close(self) -> None:
        self.routes.close()
        self._transport.close()


class AsyncStickyTransport(_Sticky, httpx.AsyncBaseTransport):
    """:class:`StickyTransport` for ``httpx.AsyncClient``."""

    _transport: httpx.AsyncBaseTransport

    def _carrier(self) -> httpx.AsyncBaseTransport:
        return httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        routes = self.routes
        routes.adopt(self._renew_carrier)
        if not routes.routing:
            await routes.ready_async()  # a registry's first membership
        refused: httpx.TransportError | None = None
        for node in self.routes.targets(request):
            try:
                return await self._transport.handle_async_request(_to(request, node, self.scheme))
            except _NOT_SENT as exc:
                if _misconfigured(exc):
                    raise
                self.routes.refused(node)
                refused = exc
        raise refused or httpx.ConnectError("no node to send the request to", request=request)

    async def aclose(self) -> None:
        self.routes.close(wait=False)  # the follower's thread ends on its own
        await self._transport.aclose()
