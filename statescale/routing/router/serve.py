"""Running the router: its listeners, the client connections and their limits, signals.

* Every client connection waits at most the idle timeout for a request and the header
  timeout for the rest of its head (:class:`~.limits.Timeouts`): half-sent heads and idle
  keep-alive connections are closed, not kept.
* At most ``max_connections`` client connections at once (by default what the process's
  file-descriptor limit allows, two each: the client's and a node's). When full, a new
  connection closes the oldest one that is only waiting for a request; if every one is
  busy, it is answered 503 and closed. A flood of slow or idle connections cannot lock
  clients out.
* SIGTERM/SIGINT: stop accepting, let requests in flight finish (``grace`` seconds at
  most); a connection that has not sent its first request yet still may; idle keep-alive
  connections are closed. SIGUSR1 (a node leaving its fleet for good): go on serving
  while requests still arrive (balancers that have not yet followed the change), and
  stop as SIGTERM does once none has for ``QUIET`` seconds (``grace`` at most).
  SIGHUP re-reads the backends file.
* With a registry (:mod:`statescale.routing.membership`), the membership follows it:
  each change it announces takes effect at once, on the loop's thread.
* With channels to pass connections through (``passes``, from the gunicorn hooks), the
  router accepts on the listener itself and hands each connection holding one whole
  request to its node's worker (:mod:`.passing`); the others are served as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import cast

from ...exceptions import ConfigError
from ..backends import Backend
from ..membership import Follower, Registry
from .admin import Admin
from .http1 import REASONS, BadRequest, RequestHead, RequestParser, reply
from .limits import GRACE, MIN_BODY_RATE
from .passing import Passer, unread
from .proxy import ClientGone, Deadline, Membership, Router

log = logging.getLogger("statescale.router")

Listen = tuple[str, int] | socket.socket
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def connection_cap(requested: int | None = None) -> int:
    """How many client connections to allow: ``requested``, but never more than the
    file-descriptor limit leaves room for (two a connection, and some to spare)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = (soft - 32) // 2 if soft != resource.RLIM_INFINITY else 1 << 16
    if room < 1:
        raise ConfigError(f"the file-descriptor limit ({soft}) leaves no room for connections")
    return max(1, min(requested or room, room))


SWEEP_INTERVAL = 0.25  # seconds between two sweeps of the connections' deadlines
#: Seconds without a request after which a node leaving its fleet stops: its balancers
#: have followed (a HAProxy reload under load took 1.3 s to switch over).
QUIET = 0.5
#: What a client may have parsed and queued before the router stops reading from it
#: (it reads on as the relay takes them): a request pipelined behind one still being
#: answered, or a body sent faster than it is taken, waits in the client's socket.
QUEUED_BYTES = 1024 * 1024
QUEUED_EVENTS = 64


class ClientConnection(asyncio.Protocol):
    """One client connection, as a protocol: what the client sends goes straight into
    its request parser, and the relay waits on one future only when the parser has
    nothing for it (streams would cost a buffer copy and a future per read)."""

    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.parser = RequestParser()
        self.deadline = Deadline()
        self.transport: asyncio.WriteTransport = cast("asyncio.WriteTransport", None)
        self.ip = "unknown"
        self.task: asyncio.Task[None] | None = None
        self.waiting = True  # for a request (not in the middle of one)
        self.served = 0
        self.error: BadRequest | None = None
        self.gone = False  # the client closed its side, or the connection was lost
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False  # the transport's write buffer is full
        self._drained: asyncio.Future[None] | None = None
        self._queued = 0  # bytes of body parsed and not yet taken by the relay
        self._held = False  # reading paused: enough is queued
        self._head_armed = False  # this wait's first byte armed the head's deadline
        self.body_since: float | None = None  # when the body being read began
        self.body_received = 0  # bytes of it taken so far

    # -- the protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.WriteTransport", transport)
        peer = transport.get_extra_info("peername")
        self.ip = peer[0] if peer else "unknown"
        if not self.server.admit(self):
            self.transport.write(reply(503, REASONS[503], "too many connections; retry shortly\n"))
            self.transport.close()
            self.gone = True
            return
        self.deadline.arm(self.server.router.timeouts.idle, self.transport)
        self.task = self.loop.create_task(self.server.serve_client(self))

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return  # refused already: what else it sends is dropped
        events = self.parser.events
        begun, before = self.parser.in_message, len(events)
        try:
            self.parser.feed(data)
        except BadRequest as exc:
            self.error = exc
        for n in range(before, len(events)):
            event = events[n]
            if isinstance(event, bytes):
                self._queued += len(event)
        if self._queued > QUEUED_BYTES or len(events) > QUEUED_EVENTS:
            self._hold()
        if self.waiting and not begun and not self._head_armed and self.deadline.target:
            # The first byte of a request (a CRLF before it too: llhttp skips those, and
            # they must not keep a connection open): its head must now come in time.
            self.deadline.arm(self.server.router.timeouts.header, self.transport)
            self._head_armed = True
        self._wake()

    def _hold(self) -> None:
        if not self._held and not self.transport.is_closing():
            self._held = True
            cast("asyncio.Transport", self.transport).pause_reading()

    def _release(self) -> None:
        if self._held:
            self._held = False
            if not self.transport.is_closing():
                cast("asyncio.Transport", self.transport).resume_reading()

    def eof_received(self) -> bool:
        self.gone = True
        self._wake()
        return True  # keep our side open: the answer may still be on its way

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self._wake()
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- what the relay uses (proxy.Client) --------------------------------------------
    async def next_event(self) -> object:
        events = self.parser.events
        while not events:
            if self.error is not None:
                raise self.error
            if self.gone:
                return None
            self._release()  # all taken: read on
            await self.wait()
        event = events.popleft()
        if isinstance(event, bytes):
            self._queued -= len(event)
            self._body_piece(len(event))
        elif isinstance(event, RequestHead):
            self.body_since = time.monotonic() if event.has_body else None
            self.body_received = 0
            self._head_armed = False  # the next request's first byte arms it again
        else:  # END
            self.body_since = None
        if self._held and self._queued <= QUEUED_BYTES // 2 and len(events) <= QUEUED_EVENTS // 2:
            self._release()
        return event

    def _body_piece(self, size: int) -> None:
        """A body that falls below ``MIN_BODY_RATE``, once the body timeout has passed
        since it began, ends its connection (a slow-body attack's bytes come in pieces,
        each in time for the timeout between two)."""
        self.body_received += size
        if self.body_since is None:
            return
        late = time.monotonic() - self.body_since - self.server.router.timeouts.body
        if late > 0 and self.body_received < late * MIN_BODY_RATE:
            raise ClientGone("request body below the minimum rate")

    def body_rate(self, now: float) -> float | None:
        """Bytes a second the body being read has averaged (None: none is, or it began
        under a second ago)."""
        if self.body_since is None or now - self.body_since < 1.0:
            return None
        return self.body_received / (now - self.body_since)

    def refuse(self, error: BadRequest) -> None:
        """A request refused: what the client has queued, and whatever else it sends
        while the router lingers, is dropped unparsed."""
        self.error = self.error or error
        self.parser.events.clear()
        self._queued = 0
        self._release()  # read on (to drop it): closing with unread bytes resets

    async def wait(self) -> None:
        """Until the client sends something, or goes."""
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        if self._paused and not self.gone:
            self._drained = self.loop.create_future()
            try:
                await self._drained
            finally:
                self._drained = None


class Server:
    """The router's client side. ``serve`` runs it until SIGTERM or SIGINT."""

    def __init__(
        self,
        router: Router,
        *,
        max_connections: int | None = None,
        passes: dict[str, socket.socket] | None = None,
    ) -> None:
        self.router = router
        #: Channels to pass connections through, by node (:mod:`.passing`).
        self.passes = passes or {}
        self._passer: Passer | None = None
        self.max_connections = connection_cap(max_connections)
        self._clients: dict[ClientConnection, None] = {}  # in the order they connected
        self._stopping = False
        self.arrivals = 0  # requests served here (the passed ones are counted apart)

    def admit(self, client: ClientConnection) -> bool:
        """Take ``client`` on, making room if the cap is reached; False when every
        connection is busy."""
        if len(self._clients) >= self.max_connections and not self._make_room():
            return False
        self._clients[client] = None
        return True

    async def serve_client(self, client: ClientConnection) -> None:
        """Relay one client's requests, one after another, until it or we are done."""
        timeouts = self.router.timeouts
        try:
            while not (self._stopping and client.served):
                client.waiting = True
                if client.deadline.target is None:  # armed at connect; again between requests
                    wait = timeouts.header if client.parser.in_message else timeouts.idle
                    client.deadline.arm(wait, client.transport)
                head = await client.next_event()
                client.deadline.disarm()
                client.waiting = False
                if not isinstance(head, RequestHead):
                    break  # gone (closed by the client, or by a deadline)
                self.arrivals += 1
                keep = await self.router.proxy(
                    head, client, client.deadline, keep_open=not self._stopping
                )
                client.served += 1
                if not keep:
                    break
        except BadRequest as exc:
            client.refuse(exc)
            client.write(reply(exc.status, REASONS.get(exc.status, "Error"), f"{exc.reason}\n"))
            await _linger(client)
        except (ClientGone, ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # a bug of ours: this connection ends, the router goes on
            log.exception("statescale router: a connection from %s failed", client.ip)
        finally:
            self._clients.pop(client, None)
            with contextlib.suppress(ConnectionError):
                await client.drain()
            client.transport.close()

    async def _sweep(self) -> None:
        """Enforce every connection's deadline, a few times a second."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            for client in list(self._clients):
                client.deadline.enforce(now)

    def _make_room(self) -> bool:
        """Close the oldest connection that is only waiting for a request, if any; else
        the one whose request body comes slowest, if under ``MIN_BODY_RATE``."""
        now = time.monotonic()
        slowest: ClientConnection | None = None
        slowest_rate = float(MIN_BODY_RATE)
        for client in self._clients:
            if client.waiting:
                slowest = client
                break
            rate = client.body_rate(now)
            if rate is not None and rate < slowest_rate:
                slowest, slowest_rate = client, rate
        if slowest is None:
            return False
        self._clients.pop(slowest)
        slowest.transport.abort()  # its wait ends as a closed connection would
        return True

    async def serve(
        self,
        listen: Listen,
        *,
        admin: tuple[str, int] | None = None,
        admin_token: str | None = None,
        admin_remote: bool = False,
        ready: Callable[[], Awaitable[None] | None] | None = None,
        grace: float = GRACE,
        registry: Registry | None = None,
    ) -> None:
        admin_server = None
        if admin is not None:
            if admin_token is None:
                raise ConfigError(
                    "the admin endpoint needs a token: set STATESCALE_ADMIN_TOKEN "
                    "(clients send Authorization: Bearer TOKEN)"
                )
            if admin[0] not in _LOOPBACK and not admin_remote:
                raise ConfigError(
                    f"the admin endpoint binds loopback only; {admin[0]} is not "
                    "(pass --admin-remote to allow it)"
                )
            admin_server = Admin(self.router, admin_token)
        loop = asyncio.get_running_loop()
        self.router.bind(loop)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._safe_reload)
        quieting: list[asyncio.Task[None]] = []  # (the loop keeps no reference to a task)

        def stop_when_quiet() -> None:
            if not quieting:
                quieting.append(loop.create_task(self._when_quiet(stop, grace)))

        loop.add_signal_handler(signal.SIGUSR1, stop_when_quiet)

        def factory() -> ClientConnection:
            return ClientConnection(self, loop)

        servers: list[asyncio.Server] = []
        if isinstance(listen, socket.socket) and self.passes:
            self._passer = Passer(
                self.router.choose,
                self.passes,
                lambda conn: self._adopt(loop, factory, conn),
            )
            self._passer.start(loop, listen)
            where = str(listen.getsockname()[:2])
        else:
            if isinstance(listen, socket.socket):  # inherited, bound and listening already
                public = await loop.create_server(factory, sock=listen)
            else:
                public = await loop.create_server(factory, *listen, backlog=1024)
            servers.append(public)
            where = ", ".join(str(s.getsockname()[:2]) for s in public.sockets)
        if admin_server is not None and admin is not None:
            servers.append(await asyncio.start_server(admin_server.handle, *admin))
        follower = None if registry is None else self._follow(registry, loop)
        checks = asyncio.create_task(self.router.check_loop())
        sweeper = asyncio.create_task(self._sweep())
        log.warning(
            "statescale router: listening on %s, nodes %s; at most %d connections%s",
            where,
            ", ".join(self.router.members),
            self.max_connections,
            "; passing connections to them" if self._passer else "",
        )
        if ready is not None:
            result = ready()
            if result is not None:
                await result
        await stop.wait()
        if follower is not None:
            follower.stop(wait=False)  # its thread ends on its own: keep the loop free
        await self._stop(servers, checks, grace)
        sweeper.cancel()

    async def _when_quiet(self, stop: asyncio.Event, limit: float) -> None:
        """Set ``stop`` once no request has arrived for ``QUIET`` seconds (on a new
        connection or one kept alive), or after ``limit`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        seen = -1
        while (now := self._arrived()) != seen:
            if loop.time() >= deadline:
                log.warning("statescale router: requests still arrive after %g s; stopping", limit)
                break
            seen = now
            await asyncio.sleep(QUIET)
        stop.set()

    def _arrived(self) -> int:
        """Requests so far, passed or served here."""
        return self.arrivals + (self._passer.passed if self._passer is not None else 0)

    def _adopt(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], ClientConnection],
        conn: socket.socket,
    ) -> None:
        """Serve ``conn``, accepted by the :class:`Passer`, the ordinary way."""

        async def adopt() -> None:
            try:
                await loop.connect_accepted_socket(factory, conn)
            except OSError:
                conn.close()

        loop.create_task(adopt())

    def _follow(self, registry: Registry, loop: asyncio.AbstractEventLoop) -> Follower:
        """Route by the registry's membership, from the loop's thread, at each change."""

        def changed(members: list[Backend]) -> None:
            loop.call_soon_threadsafe(self._apply, members, registry.url)

        return Follower(registry, changed).start()

    def _apply(self, members: list[Backend], where: str) -> None:
        if not members:
            log.error(
                "statescale router: %s lists no node; still routing to %s",
                where,
                ", ".join(self.router.members),
            )
            return
        if members == self.router.membership.backends:
            return
        self.router.set_membership(Membership(members))
        log.warning(
            "statescale router: membership from %s now %s",
            where,
            ", ".join(b.spec for b in members),
        )

    async def _stop(
        self, servers: list[asyncio.Server], checks: asyncio.Task[None], grace: float
    ) -> None:
        self._stopping = True
        busy = [c for c in self._clients if not c.waiting]
        log.warning("statescale router: stopping; %d requests in flight", len(busy))
        for server in servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._passer is not None:
            self._passer.stop()
            log.warning(
                "statescale router: passed %d connections to their nodes, proxied %d",
                self._passer.passed,
                self._passer.proxied,
            )
            # The workers are stopped after the router: connections still queued in a
            # channel would be closed unanswered. Wait until each has been taken.
            while any(unread(c) for c in self.passes.values()) and loop.time() < deadline:
                await asyncio.sleep(0.02)
        checks.cancel()
        for client in list(self._clients):  # idle keep-alive: nothing to finish
            if client.waiting and client.served:
                client.transport.abort()
        # Connections the kernel handed over just before the close may only now reach
        # connection_made: wait for theirs too, not only for the tasks there were.
        while True:
            await asyncio.sleep(0)
            tasks = {c.task for c in self._clients if c.task is not None and not c.task.done()}
            left = deadline - loop.time()
            if not tasks or left <= 0:
                return
            await asyncio.wait(tasks, timeout=left)

    def _safe_reload(self) -> None:
        try:
            self.router.reload()
        except (OSError, ConfigError) as exc:
            log.error("statescale router: could not re-read the backends: %s", exc)


LINGER = 2.0  # seconds a refused client may go on sending before the connection closes


async def _linger(client: ClientConnection) -> None:
    """After refusing a request, let the client finish sending (what it sends is
    dropped) before closing: closing with unread bytes resets the connection, and the
    client would lose the answer (nginx's lingering close)."""
    with contextlib.suppress(ConnectionError, TimeoutError):
        await client.drain()
        if client.transport.can_write_eof():
            client.transport.write_eof()
        async with asyncio.timeout(LINGER):
            while not client.gone:
                await client.wait()


def run(
    router: Router,
    listen: Listen,
    admin: tuple[str, int] | None = None,
    *,
    admin_token: str | None = None,
    admin_remote: bool = False,
    max_connections: int | None = None,
    use_uvloop: bool = True,
    registry: Registry | None = None,
    passes: dict[str, socket.socket] | None = None,
    grace: float = GRACE,
) -> None:
    """Run until SIGTERM/SIGINT, on uvloop when it is installed (and wanted); at a stop,
    what is in flight has ``grace`` seconds to finish."""
    server = Server(router, max_connections=max_connections, passes=passes)
    runner: Callable[..., object] = asyncio.run
    if use_uvloop:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            log.info("statescale router: uvloop is not installed; using asyncio's loop")
    runner(
        server.serve(
            listen,
            admin=admin,
            admin_token=admin_token,
            admin_remote=admin_remote,
            registry=registry,
            grace=grace,
        )
    )
