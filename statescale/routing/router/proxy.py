"""The router's proxying: who is in the fleet, which node a request goes to, and the
relay of one request and its response.

Requests with a session cookie go to the node the rendezvous ring gives for the session
ID (:func:`statescale.signing.routing_key`); requests without one go round robin (or by
client IP with ``ip_hash``). Health: a node that refuses a connection (or does not
accept one within ``connect_timeout``) is taken out at once and the request goes to the
key's next choice; a check every ``check_interval`` seconds brings it back.

Connections to nodes are kept alive and reused only after a response that ended
cleanly: a connection that saw any error, a malformed response, or bytes beyond the
response is closed, never pooled.

A node that closes every connection after one response (gunicorn's sync worker does)
gets each request half-closed (``shutdown(SHUT_WR)`` once it is sent): such a node waits
for its peer's close before it takes its next request, and this way it finds the close
there at once instead of waiting for a busy router to get round to it. The router
learns which nodes close from their responses (asking for keep-alive every time), and
every ``PROBE_EVERY``-th request to such a node goes without the half-close, so a node
that starts keeping connections is noticed. A node counts as closing after
``CLOSES_IN_A_ROW`` closing responses in a row (not to HEAD, whose keep-alive llhttp
cannot tell): a keep-alive node that closes now and then (a request limit, an error)
is not taken for one. A node that closes any half-closed request unanswered may take
half-closes for aborts (nginx does, with keep-alive off, on proxied requests): it never
gets another until it leaves the membership, and the request goes again on a new
connection if its method is safe (else the client gets 502). A crash looks the same
and costs the node the half-close too; never a request. ``half_close=False`` turns it
off altogether.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from functools import lru_cache, partial
from pathlib import Path
from typing import Protocol

from ...cookies import cookie_value
from ...exceptions import ConfigError
from ...signing import DEFAULT_COOKIE_NAME, routing_key
from ..backends import Backend, check, read_backends_file
from ..balancers import BackendRing
from ..balancers import get as get_balancer
from .http1 import (
    CONTINUE,
    END,
    LAST_CHUNK,
    REASONS,
    BadRequest,
    RequestHead,
    ResponseHead,
    ResponseParser,
    chunk,
    forwarded_request,
    forwarded_response,
    reply,
)
from .limits import MAX_BODY, Timeouts
from .upstream import NodeFailed, Upstream

log = logging.getLogger("statescale.router")

CHUNK = 64 * 1024
POOL_PER_NODE = 32  # idle keep-alive connections kept to each node
#: Seconds a pooled connection may wait for its next request: under gunicorn's keep-alive
#: (2 s), so a node never closes one just as a request goes on it. A request that is not
#: idempotent cannot go again when that happens (the node may have acted on it): a 502.
POOL_IDLE = 1.0
PROBE_EVERY = 64  # requests to a closing node, one of which goes without the half-close
CLOSES_IN_A_ROW = 3  # closing responses before a node counts as one that closes
# Tries of one request: a pooled connection the node had dropped, or a half-close a node
# took for an abort, costs one each (the node is then known); a third is afresh again.
ATTEMPTS = 3
_SAFE = frozenset({b"GET", b"HEAD", b"OPTIONS"})  # may go again: RFC 9110 9.2.1


#: Methods a request may be sent again with when a kept-alive node connection turns out
#: closed unanswered (RFC 9110 9.2.2).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class _Abortable(Protocol):
    def abort(self) -> None: ...


class Deadline:
    """When one connection's current wait must end. Arming it costs an attribute write,
    not a timer: :class:`~.serve.Server` sweeps every connection's deadline a few times a
    second and aborts the transport of one that has passed, which ends the wait as a
    closed connection would."""

    __slots__ = ("at", "target")

    def __init__(self) -> None:
        self.at = math.inf
        self.target: _Abortable | None = None

    def arm(self, seconds: float, target: _Abortable) -> None:
        """``target`` (a transport, or a connection to a node) is aborted if the wait
        lasts ``seconds``."""
        self.at = time.monotonic() + seconds
        self.target = target

    def disarm(self) -> None:
        self.at = math.inf
        self.target = None

    def enforce(self, now: float) -> bool:
        """Abort the waiting target if the deadline has passed."""
        if now < self.at or self.target is None:
            return False
        self.target.abort()
        self.disarm()
        return True


class _Cancel:
    """A deadline's target for a wait that has no transport to abort yet (a connect):
    cancel the task that waits, as ``asyncio.timeout`` would, without a timer per wait."""

    __slots__ = ("fired", "task")

    def __init__(self, task: asyncio.Task[None]) -> None:
        self.task = task
        self.fired = False

    def abort(self) -> None:
        self.fired = True
        self.task.cancel()


class Client(Protocol):
    """A client connection as the relay sees it (:class:`~.serve.ClientConnection`)."""

    ip: str
    transport: asyncio.WriteTransport
    task: asyncio.Task[None] | None  # the task relaying its requests

    async def next_event(self) -> object:
        """The next parsed event of the client's requests; ``None`` when it is gone."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


class _Pending:
    """What is to go to the client, written in one piece; ``sent``: whether any was."""

    __slots__ = ("client", "parts", "sent")

    def __init__(self, client: Client) -> None:
        self.client = client
        self.parts: list[bytes] = []
        self.sent = False

    def add(self, data: bytes) -> None:
        self.parts.append(data)

    def write(self) -> None:
        if self.parts:
            self.client.write(b"".join(self.parts))
            self.parts.clear()
            self.sent = True


class _Stale(Exception):
    """A pooled connection the node had closed; the request can go again on a new one."""


class ClientGone(Exception):
    """The client went away, or sent a body that ended early or too slowly."""


class Membership:
    """The fleet as the router sees it, swapped whole: a change either applies
    entirely or leaves everything as it was."""

    def __init__(self, backends: list[Backend]) -> None:
        self.backends = check(backends)
        self.by_name = {b.name: b for b in self.backends}
        self.ring: BackendRing = get_balancer("statescale").ring(self.backends)

    def with_backend(self, backend: Backend) -> Membership:
        """Add ``backend``, or move the node of that name to its address."""
        return Membership([*(b for b in self.backends if b.name != backend.name), backend])

    def without(self, name: str) -> Membership:
        if name not in self.by_name:
            raise ConfigError(f"no node named {name!r}")
        rest = [b for b in self.backends if b.name != name]
        if not rest:
            raise ConfigError(f"{name!r} is the last node; add another before removing it")
        return Membership(rest)


class Router:
    """The proxy's state: members, the ring, which nodes are down, the pool."""

    def __init__(
        self,
        backends: list[Backend],
        *,
        cookie: str = DEFAULT_COOKIE_NAME,
        ip_hash: bool = False,
        timeouts: Timeouts | None = None,
        check_interval: float = 1.0,
        backends_file: Path | None = None,
        max_body: int = MAX_BODY,
        half_close: bool = True,
    ) -> None:
        self.cookie = cookie.encode()
        self.max_body = max_body
        self.half_close = half_close
        # The nodes that close after a response, each with the requests sent it since;
        # closing responses in a row from the others; those that took a half-close for
        # an abort.
        self._closing: dict[str, int] = {}
        self._closes_seen: dict[str, int] = {}
        self._half_refused: set[str] = set()
        self.ip_hash = ip_hash
        self.timeouts = timeouts or Timeouts()
        self.check_interval = check_interval
        self.backends_file = backends_file
        self.down: set[str] = set()
        self.membership = Membership(backends)
        self._round_robin = itertools.cycle(list(self.membership.by_name))
        self._pool: dict[str, list[Upstream]] = {}
        self._new_upstream: partial[Upstream] | None = None  # on the serving loop, once known

    # -- membership and health -----------------------------------------------------
    @property
    def members(self) -> dict[str, Backend]:
        return self.membership.by_name

    def set_membership(self, membership: Membership) -> None:
        """Route by ``membership`` from now on (one assignment: atomic)."""
        before, self.membership = self.membership, membership
        self.down &= set(membership.by_name)
        self._round_robin = itertools.cycle(list(membership.by_name))
        for name in set(before.by_name) | set(self._pool):
            if membership.by_name.get(name) != before.by_name.get(name):
                # Gone, or moved: its pooled connections go, and what was learnt of it
                # (at its address there may be another server now).
                for upstream in self._pool.pop(name, []):
                    upstream.close()
                self._closing.pop(name, None)
                self._closes_seen.pop(name, None)
                self._half_refused.discard(name)

    def reload(self) -> None:
        """Re-read ``backends_file`` (one NAME=HOST:PORT a line; # comments)."""
        if self.backends_file is None:
            log.warning("statescale router: SIGHUP, but no --backends-file to re-read")
            return
        self.set_membership(Membership(read_backends_file(self.backends_file)))
        log.warning("statescale router: backends now %s", ", ".join(self.members))

    def choose(self, cookie: bytes, client_ip: str) -> str | None:
        """The node for a request: the session's owner, else round robin (or by IP)."""
        membership, down = self.membership, self.down
        if len(down) >= len(membership.backends):
            return None
        value = cookie_value(cookie, self.cookie) if cookie else None
        if value:
            return membership.ring.owner(routing_key(value), down)
        if self.ip_hash:
            return membership.ring.owner(client_ip, down)
        for _ in range(len(membership.backends)):
            name = next(self._round_robin)
            if name not in down and name in membership.by_name:
                return name
        return next(b.name for b in membership.backends if b.name not in down)

    def mark_down(self, name: str, why: str) -> None:
        if name not in self.down and name in self.members:
            self.down.add(name)
            log.warning(
                "statescale router: %s is down (%s); its sessions go to their next choice",
                name,
                why,
            )

    async def check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            for name in list(self.down):
                backend = self.members.get(name)
                if backend is None:
                    self.down.discard(name)
                    continue
                try:
                    async with asyncio.timeout(self.timeouts.connect):
                        if backend.unix:
                            _, writer = await asyncio.open_unix_connection(backend.unix)
                        else:
                            _, writer = await asyncio.open_connection(backend.host, backend.port)
                except (OSError, TimeoutError):
                    continue
                writer.close()
                self.down.discard(name)
                log.warning("statescale router: %s is back; its sessions flip back to it", name)

    # -- connections to nodes ------------------------------------------------------
    def bind(self, loop: asyncio.AbstractEventLoop) -> partial[Upstream]:
        """Connect to nodes on ``loop`` (the serving one), asking for it once, not per
        connect."""
        self._new_upstream = partial(Upstream, loop)
        return self._new_upstream

    def _pooled(self, name: str, now: float) -> Upstream | None:
        """The connection to ``name`` last put back, if usable and not idle too long
        (those below it have waited longer: they go too)."""
        idle = self._pool.get(name, [])
        while idle:
            upstream = idle.pop()
            if now - upstream.idle_since > POOL_IDLE:
                for stale in (upstream, *idle):
                    stale.close()
                idle.clear()
                return None
            if upstream.usable:
                return upstream
            upstream.close()
        return None

    def _half_close(self, name: str) -> bool:
        """Whether to half-close a request to ``name`` on a new connection: it closes
        after a response, and this is not the request that asks it again."""
        if not self.half_close or name not in self._closing or name in self._half_refused:
            return False
        sent = self._closing[name] = self._closing[name] + 1
        return sent % PROBE_EVERY != 0

    def _learn(self, name: str, upstream: Upstream) -> None:
        """What the response just ended says: whether ``name`` closes after one."""
        closes = upstream.node_closes
        if closes is None or upstream.half_closed or upstream.backend != self.members.get(name):
            return  # no whole response; one the half-close may have shaped; a node moved
        if not closes:
            self._closing.pop(name, None)
            self._closes_seen.pop(name, None)
        elif name not in self._closing:
            seen = self._closes_seen[name] = self._closes_seen.get(name, 0) + 1
            if seen >= CLOSES_IN_A_ROW:
                self._closing[name] = 0
                del self._closes_seen[name]

    def _may_go_again(
        self, name: str, request: RequestHead, upstream: Upstream, retry_ok: bool
    ) -> bool:
        """Whether a request ``name`` closed unanswered may go again on a new connection:
        ``retry_ok`` (nothing was sent that cannot go again), or a safe method the node
        may have taken for an abort because it was half-closed."""
        if upstream.half_closed:
            self._refused_half_close(name)
            return retry_ok or request.method in _SAFE
        return retry_ok

    def _refused_half_close(self, name: str) -> None:
        """``name`` closed a half-closed request unanswered: it may take half-closes for
        aborts, and gets none again while it is a member."""
        if name not in self._half_refused:
            self._half_refused.add(name)
            log.warning(
                "statescale router: %s closed a half-closed request unanswered; it gets "
                "whole connections from now on",
                name,
            )

    def _release(self, name: str, upstream: Upstream, reusable: bool) -> None:
        self._learn(name, upstream)
        idle = self._pool.setdefault(name, [])
        # Only to the node as it is now: one that moved (its name registered again at
        # another address) while this request ran must not get the old connection back.
        same = upstream.backend is not None and upstream.backend == self.members.get(name)
        if reusable and same and len(idle) < POOL_PER_NODE:
            upstream.idle_since = upstream.loop.time()
            idle.append(upstream)
        else:
            upstream.close()

    async def _connect(
        self, head: RequestHead, client: Client, deadline: Deadline, *, fresh: bool
    ) -> tuple[str, Upstream, bool] | None:
        """A connection to the request's node: (name, connection, reused). The connect
        timeout is the client's deadline (swept; no timer per connect)."""
        new_upstream = self._new_upstream
        if new_upstream is None:
            new_upstream = self.bind(asyncio.get_running_loop())
        loop = new_upstream.args[0]
        for _ in range(len(self.members)):
            name = self.choose(head.cookie, client.ip)
            if name is None:
                return None
            pooled = None if fresh else self._pooled(name, loop.time())
            if pooled is not None:
                return name, pooled, True
            backend = self.members[name]
            task = client.task if client.task is not None else asyncio.current_task()
            assert task is not None
            cancel = _Cancel(task)
            deadline.arm(self.timeouts.connect, cancel)
            try:
                if backend.unix:
                    _, upstream = await loop.create_unix_connection(new_upstream, backend.unix)
                else:
                    _, upstream = await loop.create_connection(
                        new_upstream, backend.host, backend.port
                    )
            except asyncio.CancelledError:
                if not cancel.fired or task.uncancel() > 0:
                    raise  # not ours, or another cancel came with it (as asyncio.timeout)
                self.mark_down(name, "TimeoutError")
                continue
            except OSError as exc:
                self.mark_down(name, type(exc).__name__)
                continue
            finally:
                deadline.disarm()
            upstream.backend = backend
            return name, upstream, False
        return None

    # -- one request ---------------------------------------------------------------
    async def proxy(
        self,
        head: RequestHead,
        client: Client,
        deadline: Deadline,
        *,
        keep_open: bool,
    ) -> bool:
        """Relay one request and its response; whether the client connection stays
        open (only if ``keep_open``, the client allows it and all went cleanly).

        The body is read whole first (up to ``max_body``), as nginx does: no node sees
        any part of a request the router would refuse, and a slow upload never holds a
        node's worker."""
        if head.length > self.max_body:
            raise BadRequest(413, f"request body over {self.max_body} bytes")
        if head.expect_continue and head.has_body:
            client.write(CONTINUE)  # the router reads the body itself; the node never asks
        body = await self._read_body(client, deadline)
        request = forwarded_request(head, len(body), _forwarding(client.ip)) + body
        client_keep = keep_open and head.keep_alive
        for attempt in range(ATTEMPTS):
            fresh = attempt > 0
            target = await self._connect(head, client, deadline, fresh=fresh)
            if target is None:
                client.write(reply(503, REASONS[503], "no backend node is available\n"))
                return client_keep
            name, upstream, reused = target
            try:
                upstream.begin(ResponseParser(head_only=head.method == b"HEAD"))
                upstream.send(request)
                if not reused and self._half_close(name):
                    upstream.send_eof()
                return await self._relay(
                    name,
                    head,
                    upstream,
                    client=client,
                    deadline=deadline,
                    client_keep=client_keep,
                    # Again only what may be sent twice (RFC 9110 9.2.2): the node may have
                    # acted on it before it closed unanswered.
                    retry_ok=reused and not head.has_body and head.method in IDEMPOTENT,
                )
            except _Stale:
                continue  # closed unanswered, and the request may go again: afresh
            finally:
                self._release(name, upstream, upstream.finish())
        client.write(reply(502, REASONS[502], "the nodes closed the connection unanswered\n"))
        return False

    async def _read_body(self, client: Client, deadline: Deadline) -> bytes:
        pieces: list[bytes] = []
        size = 0
        while True:
            deadline.arm(self.timeouts.body, client.transport)
            try:
                event = await client.next_event()
            finally:
                deadline.disarm()
            if event is END:
                return b"".join(pieces)
            if not isinstance(event, bytes):
                raise ClientGone("request body ended early, or too slowly")
            size += len(event)
            if size > self.max_body:
                raise BadRequest(413, f"request body over {self.max_body} bytes")
            pieces.append(event)

    async def _relay(
        self,
        name: str,
        request: RequestHead,
        upstream: Upstream,
        *,
        client: Client,
        deadline: Deadline,
        client_keep: bool,
        retry_ok: bool,
    ) -> bool:
        """Relay the node's response; whether the client connection stays open.
        ``retry_ok``: a pooled connection with nothing sent but the request may turn
        out closed by the node; then raise :class:`_Stale` so the request goes again.
        What goes to the client is written in one piece whenever the router is about to
        wait for more from the node (a small response: one write)."""
        out = _Pending(client)
        head: ResponseHead | None = None
        chunked = bodiless = False  # chunked: re-chunked for the client
        try:
            while True:
                event = await self._next(upstream, out, deadline)
                if event is END:
                    if head is not None:
                        break
                    continue  # the end of an interim response (103, a stray 100)
                if isinstance(event, ResponseHead):
                    if event.status >= 200:  # interim ones are not relayed
                        head = event
                        bodiless = request.method == b"HEAD" or event.status in (204, 304)
                        # HTTP/1.0 cannot read chunks: its body ends when we close instead
                        chunked = not bodiless and event.length < 0 and request.http11
                        out.add(forwarded_response(event, chunked=chunked, keep_alive=client_keep))
                elif head is not None:
                    assert isinstance(event, bytes)
                    out.add(chunk(event) if chunked else event)
        except NodeFailed as exc:
            if (
                head is None
                and exc.closed
                and self._may_go_again(name, request, upstream, retry_ok)
            ):
                raise _Stale from exc
            if out.sent:  # the client has part of a response: it can only be cut
                out.write()
            else:
                client.write(reply(502, REASONS[502], f"node {name} failed: {exc}\n"))
            log.warning("statescale router: %s failed a response: %s", name, exc)
            return False
        if chunked:
            out.add(LAST_CHUNK)
        out.write()
        deadline.arm(self.timeouts.response, client.transport)  # a client that never reads
        try:
            await client.drain()
        finally:
            deadline.disarm()
        return client_keep and (chunked or head.length >= 0 or bodiless)

    async def _next(self, upstream: Upstream, out: _Pending, deadline: Deadline) -> object:
        """The response's next event. If the router must wait for the node (which then
        has the response timeout to answer), what is pending goes to the client first,
        unless the node has failed already: then nothing of it is sent."""
        if upstream.ready():
            return await upstream.next_event()
        if out.parts and upstream.failure is None and not upstream.closed:
            out.write()
            deadline.arm(self.timeouts.response, out.client.transport)  # one that never reads
            try:
                await out.client.drain()
            finally:
                deadline.disarm()
        deadline.arm(self.timeouts.response, upstream)
        try:
            return await upstream.next_event()
        finally:
            deadline.disarm()

    def describe(self) -> dict[str, object]:
        return {
            "nodes": [
                {
                    "name": b.name,
                    "addr": b.address,
                    "weight": b.weight,
                    "up": b.name not in self.down,
                }
                for b in self.membership.backends
            ]
        }


@lru_cache(maxsize=4096)
def _forwarding(client_ip: str) -> bytes:
    """The header lines the router adds to each request from ``client_ip``."""
    return b"X-Forwarded-For: %b\r\nX-Forwarded-Proto: http\r\nConnection: keep-alive\r\n" % (
        client_ip.encode()
    )
