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
  connections are closed. SIGHUP re-reads the backends file.
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

from ...exceptions import ConfigError
from .admin import Admin
from .http1 import REASONS, BadRequest, RequestParser, reply
from .proxy import ClientGone, Deadline, Router, read_head

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


class _Client:
    """One client connection: whether it is only waiting for a request, and until when
    its current wait may last."""

    __slots__ = ("deadline", "served", "task", "waiting")

    def __init__(self, task: asyncio.Task[None] | None) -> None:
        self.task = task
        self.waiting = True
        self.served = 0
        self.deadline = Deadline()


class Server:
    """The router's client side. ``serve`` runs it until SIGTERM or SIGINT."""

    def __init__(self, router: Router, *, max_connections: int | None = None) -> None:
        self.router = router
        self.max_connections = connection_cap(max_connections)
        self._clients: dict[_Client, None] = {}  # in the order they connected
        self._stopping = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= self.max_connections and not self._make_room():
            writer.write(reply(503, REASONS[503], "too many connections; retry shortly\n"))
            writer.close()
            return
        client = _Client(asyncio.current_task())
        self._clients[client] = None
        peer = writer.get_extra_info("peername")
        client_ip = peer[0] if peer else "unknown"
        parser = RequestParser()
        try:
            timeouts, deadline = self.router.timeouts, client.deadline
            while not (self._stopping and client.served):
                client.waiting = True
                head = await read_head(parser, reader, timeouts, deadline, writer.transport)
                client.waiting = False
                if head is None:
                    break
                keep = await self.router.proxy(
                    head,
                    parser,
                    (reader, writer),
                    client_ip,
                    deadline,
                    keep_open=not self._stopping,
                )
                client.served += 1
                if not keep:
                    break
        except BadRequest as exc:
            writer.write(reply(exc.status, REASONS.get(exc.status, "Error"), f"{exc.reason}\n"))
            await _linger(reader, writer)
        except (ClientGone, ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # a bug of ours: this connection ends, the router goes on
            log.exception("statescale router: a connection from %s failed", client_ip)
        finally:
            self._clients.pop(client, None)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()

    async def _sweep(self) -> None:
        """Enforce every connection's deadline, a few times a second."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            for client in list(self._clients):
                client.deadline.enforce(now)

    def _make_room(self) -> bool:
        """Close the oldest connection that is only waiting for a request, if any."""
        for client in self._clients:
            if client.waiting and client.task is not None:
                client.task.cancel()  # its own finally takes it off the list
                self._clients.pop(client)
                return True
        return False

    async def serve(
        self,
        listen: Listen,
        *,
        admin: tuple[str, int] | None = None,
        admin_token: str | None = None,
        admin_remote: bool = False,
        ready: Callable[[], Awaitable[None] | None] | None = None,
        grace: float = 10.0,
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
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._safe_reload)
        if isinstance(listen, socket.socket):  # inherited, bound and listening already
            public = await asyncio.start_server(self.handle, sock=listen)
        else:
            public = await asyncio.start_server(self.handle, *listen, backlog=1024)
        servers = [public]
        if admin_server is not None and admin is not None:
            servers.append(await asyncio.start_server(admin_server.handle, *admin))
        checks = asyncio.create_task(self.router.check_loop())
        sweeper = asyncio.create_task(self._sweep())
        where = ", ".join(str(s.getsockname()[:2]) for s in public.sockets)
        log.warning(
            "statescale router: listening on %s, nodes %s; at most %d connections",
            where,
            ", ".join(self.router.members),
            self.max_connections,
        )
        if ready is not None:
            result = ready()
            if result is not None:
                await result
        await stop.wait()
        await self._stop(servers, checks, grace)
        sweeper.cancel()

    async def _stop(
        self, servers: list[asyncio.Server], checks: asyncio.Task[None], grace: float
    ) -> None:
        self._stopping = True
        busy = [c for c in self._clients if not c.waiting]
        log.warning("statescale router: stopping; %d requests in flight", len(busy))
        for server in servers:
            server.close()
        checks.cancel()
        for client in list(self._clients):  # idle keep-alive: nothing to finish
            if client.waiting and client.served and client.task is not None:
                client.task.cancel()
        tasks = {c.task for c in self._clients if c.task is not None}
        if tasks:
            await asyncio.wait(tasks, timeout=grace)

    def _safe_reload(self) -> None:
        try:
            self.router.reload()
        except (OSError, ConfigError) as exc:
            log.error("statescale router: could not re-read the backends: %s", exc)


LINGER = 2.0  # seconds a refused client may go on sending before the connection closes


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After refusing a request, let the client finish sending (what it sends is
    dropped) before closing: closing with unread bytes resets the connection, and the
    client would lose the answer (nginx's lingering close)."""
    with contextlib.suppress(ConnectionError, TimeoutError):
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER):
            dropped = 0
            while dropped < 1 << 20 and (data := await reader.read(65536)):
                dropped += len(data)


def run(
    router: Router,
    listen: Listen,
    admin: tuple[str, int] | None = None,
    *,
    admin_token: str | None = None,
    admin_remote: bool = False,
    max_connections: int | None = None,
    use_uvloop: bool = True,
) -> None:
    """Run until SIGTERM/SIGINT, on uvloop when it is installed (and wanted)."""
    server = Server(router, max_connections=max_connections)
    runner: Callable[..., object] = asyncio.run
    if use_uvloop:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            log.info("statescale router: uvloop is not installed; using asyncio's loop")
    runner(server.serve(listen, admin=admin, admin_token=admin_token, admin_remote=admin_remote))
