"""Test nodes for the router: small HTTP servers that answer with their name and what
they received, and the router as a real process in front of them."""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from benchmarks.rig.harness import ADMIN_TOKEN, start_router
from statescale.processes import free_port
from statescale.routing.backends import Backend

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def next_head(conn: socket.socket, buffer: bytes) -> tuple[bytes, bytes] | None:
    """The next request head from ``conn`` (``buffer``: what was read past the last),
    and what came after it; None if the connection closed first."""
    while b"\r\n\r\n" not in buffer:
        data = conn.recv(65536)
        if not data:
            return None
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest


class RawNode:
    """A node on a bare socket, for answers no HTTP server library would send: each
    connection it accepts goes to :meth:`answer` on a thread of its own."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.listener.close()


class Echo(BaseHTTPRequestHandler):
    """Answers with its name, the request's method, body and forwarding headers;
    /chunked answers with a chunked body."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1  # type: ignore[attr-defined]
        self.server.open.add(self.connection)  # type: ignore[attr-defined]

    def finish(self) -> None:
        self.server.open.discard(self.connection)  # type: ignore[attr-defined]
        super().finish()

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Transfer-Encoding") == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        answer = json.dumps(
            {
                "node": self.server.name,  # type: ignore[attr-defined]
                "method": self.command,
                "body": body.decode(),
                "xff": self.headers.get("X-Forwarded-For"),
                "proto": self.headers.get("X-Forwarded-Proto"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


def kill(server: ThreadingHTTPServer) -> None:
    """As a dead process would: no listener, and every open connection closed."""
    server.shutdown()
    server.server_close()
    for conn in list(server.open):  # type: ignore[attr-defined]
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
            conn.close()


def echo_servers(n: int) -> Iterator[list[tuple[str, ThreadingHTTPServer]]]:
    servers = []
    for i in range(1, n + 1):
        server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
        server.name = f"node{i}"  # type: ignore[attr-defined]
        server.connections, server.open = 0, set()  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append((f"node{i}", server))
    yield servers
    for _, server in servers:
        server.shutdown()
        server.server_close()


class RouterProcess:
    def __init__(self, backends: list[Backend], *extra: str) -> None:
        self.port, self.admin = free_port(), free_port()
        admin = ("--admin", f"127.0.0.1:{self.admin}", "--check-interval", "0.2")
        self.process = start_router(backends, self.port, *admin, *extra, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=1)
            try:
                probe.request("GET", "/nodes", headers=AUTH)
                probe.getresponse().read()
                return
            except OSError:
                time.sleep(0.05)
            finally:
                probe.close()
        raise RuntimeError("router did not start")

    def nodes(self, method: str = "GET", query: str = "") -> dict[str, object]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=5)
        try:
            conn.request(method, "/nodes" + query, headers=AUTH)
            return json.loads(conn.getresponse().read())  # type: ignore[no-any-return]
        finally:
            conn.close()

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(10)
        assert self.process.stderr is not None
        err = self.process.stderr.read().decode()
        self.process.stderr.close()
        return err


def ask(port: int, cookie: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Cookie": f"statescale={cookie}"} if cookie else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_until_serving(port: int) -> None:
    """Return once a router (or balancer) on ``port`` answers."""
    for _ in range(100):
        try:
            ask(port)
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answered on port {port}")
