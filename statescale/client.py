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
  apply within a second or two) or a fixed list (``backends=["a=10.0.0.1:8000", ...]``).
* The session is read from the request's ``Cookie`` header (``cookie``, the nodes'
  cookie name); the router's rule: the ID before the signature, hashed on ``balancer``'s
  ring (the nodes' ``STATESCALE_BALANCER``).
* A node that refuses the connection is skipped for ``retry_after`` seconds and the
  request goes to the session's next owner on the ring, as statescale's router does.
  Other errors (a timeout, a reset mid-request) are raised: the request may have run.
* The request's URL keeps its host for ``Host`` and for the client's cookie jar; only
  the connection goes to the node.

:class:`AsyncStickyTransport` is the same for ``httpx.AsyncClient``.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Iterator, Sequence
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
        self._balancer = get_balancer(balancer)
        self._down: dict[str, float] = {}  # node -> until when it is skipped
        self._lock = threading.Lock()
        self.follower: Any = None
        self.current: tuple[BackendRing, Iterator[str]]
        if backends is not None:
            parsed = [b if isinstance(b, Backend) else Backend.parse(b) for b in backends]
            self._use(check(parsed))
            return
        from .routing.membership import Follower, open_registry

        found = open_registry(registry or "")
        self.follower = Follower(found, self._follow).start()
        if not self.follower.wait(bool, 10.0):  # (the first membership sets ``current``)
            self.follower.stop()
            raise ConfigError(f"{registry}: no node registered within 10 s")

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
        name = self.cookie.encode()
        for header in request.headers.get_list("cookie"):
            value = cookie_value(header.encode("latin-1", "replace"), name)
            if value is not None:
                return routing_key(value)
        return None

    def refused(self, node: Backend) -> None:
        with self._lock:
            self._down[node.name] = time.monotonic() + self.retry_after

    def close(self, *, wait: bool = True) -> None:
        if self.follower is not None:
            self.follower.stop(wait=wait)


def _to(request: httpx.Request, node: Backend) -> httpx.Request:
    """``request`` sent to ``node``: a new request, so the client's own keeps its URL."""
    url = request.url.copy_with(scheme="http", host=node.host, port=node.port)
    return httpx.Request(
        request.method,
        url,
        headers=request.headers,
        stream=request.stream,
        extensions=request.extensions,
    )


class _Sticky:
    """What both transports take: the membership (``registry`` or ``backends``), the
    nodes' cookie name and ``balancer``, how long a refusing node is skipped, and the
    httpx transport that carries the requests (default: a new pooled one)."""

    def __init__(
        self,
        *,
        registry: str | None = None,
        backends: Sequence[Backend | str] | None = None,
        cookie: str = DEFAULT_COOKIE_NAME,
        balancer: str = "statescale",
        retry_after: float = RETRY_AFTER,
        transport: Any = None,
    ) -> None:
        self.routes = _Routes(
            registry=registry,
            backends=backends,
            cookie=cookie,
            balancer=balancer,
            retry_after=retry_after,
        )
        self._transport = transport or self._carrier()

    def _carrier(self) -> Any:
        raise NotImplementedError


class StickyTransport(_Sticky, httpx.BaseTransport):
    """Sends each request to its session's owner (see the module's docstring)."""

    _transport: httpx.BaseTransport

    def _carrier(self) -> httpx.BaseTransport:
        return httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        refused: httpx.ConnectError | None = None
        for node in self.routes.targets(request):
            try:
                return self._transport.handle_request(_to(request, node))
            except httpx.ConnectError as exc:
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
        refused: httpx.ConnectError | None = None
        for node in self.routes.targets(request):
            try:
                return await self._transport.handle_async_request(_to(request, node))
            except httpx.ConnectError as exc:
                self.routes.refused(node)
                refused = exc
        raise refused or httpx.ConnectError("no node to send the request to", request=request)

    async def aclose(self) -> None:
        self.routes.close(wait=False)  # the follower's thread ends on its own
        await self._transport.aclose()
