"""``statescale router``: a sticky reverse proxy for development and single-box use.

Requests with a session cookie go to the node the ring gives for the session ID (the
cookie up to its first ``.``); requests without one go round robin (or by client IP with
``ip_hash``). HTTP/1.1 keep-alive on both sides, bodies streamed both ways,
``X-Forwarded-For`` and ``X-Forwarded-Proto`` added.

Health: a node that refuses a connection (or does not accept one within
``connect_timeout``) is taken out at once and the request goes to the key's next choice;
an active check every ``check_interval`` seconds brings it back, and then its sessions
flip back to it (it owns them again; with the memory store they start afresh there).
Membership changes at run time: SIGHUP re-reads ``backends_file``; the admin endpoint
(a separate loopback port) answers ``GET /nodes``, ``POST /nodes?name=N&addr=H:P`` and
``DELETE /nodes?name=N``. SIGTERM stops accepting and lets requests in flight finish.
When no node can serve: ``503`` with a body that says so; a node that fails mid-request:
``502``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from ..exceptions import ConfigError
from ..signing import routing_key
from .backends import Backend, read_backends_file
from .balancers import get as get_balancer

log = logging.getLogger("statescale.router")

MAX_HEAD = 64 * 1024
CHUNK = 64 * 1024
POOL_PER_NODE = 32  # idle keep-alive connections kept to each node
_HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"upgrade",
    b"x-forwarded-for",
    b"x-forwarded-proto",
}
_NO_BODY_STATUS = (204, 304)
_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Stale(Exception):
    """A pooled connection the node had closed; the request can go again on a new one."""


class _Head:
    """A parsed request or response head."""

    __slots__ = ("first", "headers", "version_11")

    def __init__(self, raw: bytes) -> None:
        lines = raw[:-4].split(b"\r\n")
        self.first = lines[0]
        self.headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise ValueError(f"bad header line {line[:80]!r}")
            self.headers.append((name, value.strip()))
        self.version_11 = self.first.endswith(b"HTTP/1.1") or self.first.startswith(b"HTTP/1.1")

    def get(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def tokens(self, name: bytes) -> set[bytes]:
        found: set[bytes] = set()
        for key, value in self.headers:
            if key.lower() == name:
                found.update(t.strip().lower() for t in value.split(b","))
        return found

    def keep_alive(self) -> bool:
        tokens = self.tokens(b"connection")
        return b"keep-alive" in tokens if not self.version_11 else b"close" not in tokens

    def body_kind(self) -> tuple[str, int]:
        if b"chunked" in self.tokens(b"transfer-encoding"):
            return "chunked", 0
        length = self.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                raise ValueError("bad Content-Length")
            return "length", int(length)
        return "none", 0

    def forwarded(self, extra: list[tuple[bytes, bytes]]) -> bytes:
        kept = [(k, v) for k, v in self.headers if k.lower() not in _HOP_BY_HOP]
        lines = [self.first, *(k + b": " + v for k, v in kept + extra)]
        return b"\r\n".join(lines) + b"\r\n\r\n"


async def _copy_exact(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    while n > 0:
        data = await reader.read(min(CHUNK, n))
        if not data:
            raise ConnectionResetError("body ended early")
        writer.write(data)
        n -= len(data)
        await writer.drain()


async def _copy_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        line = await reader.readuntil(b"\r\n")
        writer.write(line)
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while True:  # trailers, then the blank line
                trailer = await reader.readuntil(b"\r\n")
                writer.write(trailer)
                if trailer == b"\r\n":
                    await writer.drain()
                    return
        await _copy_exact(reader, writer, size + 2)


async def _copy_body(
    kind: str, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    if kind == "length":
        await _copy_exact(reader, writer, n)
    elif kind == "chunked":
        await _copy_chunked(reader, writer)


def _reply(status: str, body: str, *, close: bool = True) -> bytes:
    data = body.encode()
    connection = b"close" if close else b"keep-alive"
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(data)}\r\nCache-Control: no-store\r\n".encode()
        + b"Connection: "
        + connection
        + b"\r\n\r\n"
        + data
    )


def _cookie(header: bytes | None, name: bytes) -> str | None:
    if not header:
        return None
    for part in header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == name:
            try:
                return value.strip(b'"').decode("ascii")
            except UnicodeDecodeError:
                return None
    return None


class Router:
    """The proxy's state: members, the ring, which nodes are down."""

    def __init__(
        self,
        backends: list[Backend],
        *,
        cookie: str = "statescale",
        ip_hash: bool = False,
        connect_timeout: float = 1.0,
        check_interval: float = 1.0,
        backends_file: Path | None = None,
    ) -> None:
        self.cookie = cookie.encode()
        self.ip_hash = ip_hash
        self.connect_timeout = connect_timeout
        self.check_interval = check_interval
        self.backends_file = backends_file
        self.down: set[str] = set()
        self._set_members(backends)
        self._pool: dict[str, list[_Conn]] = {}
        self._active: set[asyncio.Task[None]] = set()  # client connections
        self._idle: set[asyncio.Task[None]] = set()  # ...waiting for their next request
        self._servers: list[asyncio.Server] = []

    # -- membership and health -----------------------------------------------------
    def _set_members(self, backends: list[Backend]) -> None:
        self.members = {b.name: b for b in backends}
        self.ring = get_balancer("statescale").ring(backends)
        self.down &= set(self.members)
        self._round_robin = itertools.cycle(list(self.members))

    def reload(self) -> None:
        """Re-read ``backends_file`` (one NAME=HOST:PORT a line; # comments)."""
        if self.backends_file is None:
            log.warning("statescale router: SIGHUP, but no --backends-file to re-read")
            return
        self._set_members(read_backends_file(self.backends_file))
        log.warning("statescale router: backends now %s", ", ".join(self.members))

    def choose(self, cookie: str | None, client_ip: str) -> str | None:
        """The node for a request: the session's owner, else round robin (or IP)."""
        up = [name for name in self.members if name not in self.down]
        if not up:
            return None
        if cookie:
            return self.ring.owner(routing_key(cookie), tuple(self.down))
        if self.ip_hash:
            return self.ring.owner(client_ip, tuple(self.down))
        for _ in range(len(self.members)):
            name = next(self._round_robin)
            if name not in self.down:
                return name
        return up[0]

    def mark_down(self, name: str, why: str) -> None:
        if name not in self.down:
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
                    _, writer = await asyncio.wait_for(
                        asyncio.open_connection(backend.host, backend.port), self.connect_timeout
                    )
                except (OSError, asyncio.TimeoutError):
                    continue
                writer.close()
                self.down.discard(name)
                log.warning("statescale router: %s is back; its sessions flip back to it", name)

    # -- proxying ----------------------------------------------------------------
    def _pooled(self, name: str) -> _Conn | None:
        idle = self._pool.get(name, [])
        while idle:
            reader, writer = idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return None

    def _release(self, name: str, conn: _Conn, reusable: bool) -> None:
        idle = self._pool.setdefault(name, [])
        if reusable and name in self.members and len(idle) < POOL_PER_NODE:
            idle.append(conn)
        else:
            conn[1].close()

    async def _connect(
        self, head: _Head, client_ip: str, *, fresh: bool = False
    ) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter, bool] | None:
        """A connection to the request's node: (name, reader, writer, reused)."""
        cookie = _cookie(head.get(b"cookie"), self.cookie)
        for _ in range(len(self.members)):
            name = self.choose(cookie, client_ip)
            if name is None:
                return None
            pooled = None if fresh else self._pooled(name)
            if pooled is not None:
                return name, pooled[0], pooled[1], True
            backend = self.members[name]
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(backend.host, backend.port), self.connect_timeout
                )
            except (OSError, asyncio.TimeoutError) as exc:
                self.mark_down(name, type(exc).__name__)
                continue
            return name, reader, writer, False
        return None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._active.add(task)
        peer = writer.get_extra_info("peername")
        client_ip = peer[0] if peer else "unknown"
        try:
            while await self._one_request(reader, writer, client_ip, task):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:  # shutting down while idle between requests
            pass
        finally:
            writer.close()
            if task is not None:
                self._active.discard(task)
                self._idle.discard(task)

    async def _one_request(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client_ip: str,
        task: asyncio.Task[None] | None,
    ) -> bool:
        """Proxy one request; whether the client connection stays open."""
        head = await self._read_request(reader, writer, task)
        if head is None:
            return False
        try:
            kind, length = head.body_kind()
        except ValueError as exc:
            writer.write(_reply("400 Bad Request", f"{exc}\n"))
            return False
        client_keep = head.keep_alive()
        extra = [
            (b"X-Forwarded-For", client_ip.encode()),
            (b"X-Forwarded-Proto", b"http"),
            (b"Connection", b"keep-alive"),
        ]
        for fresh in (False, True):
            target = await self._connect(head, client_ip, fresh=fresh)
            if target is None:
                writer.write(_reply("503 Service Unavailable", "no backend node is available\n"))
                await _skip_body(kind, length, reader)
                return client_keep
            name, up_reader, up_writer, reused = target
            reusable = False
            try:
                retry_ok = reused and kind == "none"  # nothing sent yet that cannot go again
                try:
                    up_writer.write(head.forwarded(extra))
                    await _copy_body(kind, length, reader, up_writer)
                    await up_writer.drain()
                except ConnectionError as exc:  # sending to the node, not to the client
                    if retry_ok:
                        raise _Stale from exc
                    raise
                keep, reusable = await self._relay_response(
                    name, head, client_keep, up_reader, writer, retry_ok=retry_ok
                )
                return keep
            except _Stale:
                continue  # the node had closed our pooled connection: once more, afresh
            finally:
                self._release(name, (up_reader, up_writer), reusable)
        return False

    async def _read_request(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        task: asyncio.Task[None] | None,
    ) -> _Head | None:
        """The next request head; ``None`` when the connection is over. While waiting
        for it the connection counts as idle (a shutdown need not wait for it)."""
        if task is not None:
            self._idle.add(task)
        try:
            return _Head(await reader.readuntil(b"\r\n\r\n"))
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError:
            writer.write(_reply("431 Request Header Fields Too Large", "request head too large\n"))
            return None
        except ValueError as exc:
            writer.write(_reply("400 Bad Request", f"{exc}\n"))
            return None
        finally:
            if task is not None:
                self._idle.discard(task)

    async def _relay_response(
        self,
        name: str,
        request: _Head,
        client_keep: bool,
        up_reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        retry_ok: bool,
    ) -> tuple[bool, bool]:
        """Relay the node's response; (keep the client connection, reuse the node's).
        ``retry_ok``: a pooled connection with nothing sent but the head may turn out
        closed by the node; then raise :class:`_Stale` so the request goes again."""
        try:
            response = _Head(await up_reader.readuntil(b"\r\n\r\n"))
            status = int(response.first.split(b" ", 2)[1])
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError) as exc:
            closed = isinstance(exc, asyncio.IncompleteReadError | ConnectionError)
            if retry_ok and closed:
                raise _Stale from exc
            writer.write(_reply("502 Bad Gateway", f"node {name} failed: {type(exc).__name__}\n"))
            return False, False
        if request.first.startswith(b"HEAD ") or status in _NO_BODY_STATUS or status < 200:
            kind, length = "length", 0
        else:
            kind, length = response.body_kind()
        keep = client_keep and kind != "none"
        writer.write(response.forwarded([(b"Connection", b"keep-alive" if keep else b"close")]))
        if kind == "none":  # delimited by the node closing: so must we
            while data := await up_reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
        else:
            await _copy_body(kind, length, up_reader, writer)
        await writer.drain()
        return keep, kind != "none" and response.keep_alive()

    async def admin(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """``GET /nodes``; ``POST /nodes?name=N&addr=H:P[&weight=W]``; ``DELETE /nodes?name=N``."""
        try:
            head = _Head(await reader.readuntil(b"\r\n\r\n"))
            method, target, _ = head.first.decode().split(" ", 2)
            url = urlsplit(target)
            args = {k: v[0] for k, v in parse_qs(url.query).items()}
            body: dict[str, object]
            if url.path != "/nodes":
                status, body = "404 Not Found", {"error": "use /nodes"}
            elif method == "GET":
                status, body = "200 OK", self.describe()
            elif method == "POST":
                backend = Backend.parse(
                    f"{args.get('name', '')}={args.get('addr', '')}*{args.get('weight', '1')}"
                )
                self._set_members(
                    [*[b for b in self.members.values() if b.name != backend.name], backend]
                )
                status, body = "200 OK", self.describe()
            elif method == "DELETE" and args.get("name") in self.members:
                self._set_members([b for n, b in self.members.items() if n != args["name"]])
                status, body = "200 OK", self.describe()
            else:
                status, body = (
                    "400 Bad Request",
                    {"error": "GET, POST ?name=&addr= or DELETE ?name="},
                )
        except (
            ConfigError,
            ValueError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ) as exc:
            status, body = "400 Bad Request", {"error": str(exc)}
        data = json.dumps(body).encode()
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    def describe(self) -> dict[str, object]:
        return {
            "nodes": [
                {
                    "name": b.name,
                    "addr": b.address,
                    "weight": b.weight,
                    "up": b.name not in self.down,
                }
                for b in self.members.values()
            ]
        }

    # -- running -------------------------------------------------------------------
    async def serve(
        self,
        listen: tuple[str, int] | socket.socket,
        *,
        admin: tuple[str, int] | None = None,
        ready: Callable[[], Awaitable[None] | None] | None = None,
        grace: float = 10.0,
    ) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._safe_reload)
        if isinstance(listen, socket.socket):  # inherited, bound and listening already
            public = await asyncio.start_server(self.handle, sock=listen, limit=MAX_HEAD)
        else:
            public = await asyncio.start_server(self.handle, *listen, limit=MAX_HEAD, backlog=1024)
        self._servers.append(public)
        where = ", ".join(str(s.getsockname()[:2]) for s in public.sockets)
        if admin is not None:
            self._servers.append(await asyncio.start_server(self.admin, *admin, limit=MAX_HEAD))
        checks = asyncio.create_task(self.check_loop())
        log.warning("statescale router: listening on %s, nodes %s", where, ", ".join(self.members))
        if ready is not None:
            result = ready()
            if result is not None:
                await result
        await stop.wait()
        busy = self._active - self._idle
        log.warning("statescale router: stopping; %d requests in flight", len(busy))
        for server in self._servers:
            server.close()
        checks.cancel()
        for task in list(self._idle):  # idle keep-alive connections: nothing to finish
            task.cancel()
        if self._active:
            await asyncio.wait(self._active, timeout=grace)

    def _safe_reload(self) -> None:
        try:
            self.reload()
        except (OSError, ConfigError) as exc:
            log.error("statescale router: could not re-read the backends: %s", exc)


async def _skip_body(kind: str, length: int, reader: asyncio.StreamReader) -> None:
    sink = _Sink()
    await _copy_body(kind, length, reader, sink)  # type: ignore[arg-type]


class _Sink:
    """A writer that drops what it is given (to read past a body nobody wants)."""

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass


def run(
    router: Router,
    listen: tuple[str, int] | socket.socket,
    admin: tuple[str, int] | None = None,
    *,
    use_uvloop: bool = True,
) -> None:
    """Run until SIGTERM/SIGINT, on uvloop when it is installed (and wanted)."""
    runner: Callable[..., object] = asyncio.run
    if use_uvloop:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            log.info("statescale router: uvloop is not installed; using asyncio's loop")
    runner(router.serve(listen, admin=admin))
