"""statescale router against what an attacker or a broken peer sends: ambiguous framing,
slow and idle connections, too many connections, a broken node, the admin endpoint.
Numbers refer to docs/RELIABILITY.md. Real router processes, real sockets."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from benchmarks.rig.harness import ADMIN_TOKEN, start_router
from statescale.processes import free_port
from statescale.routing.backends import Backend
from tests.routing.echo import (
    AUTH,
    RawNode,
    RouterProcess,
    ask,
    echo_servers,
    next_head,
    wait_until_serving,
)

pytestmark = pytest.mark.integration

HEAD = "POST / HTTP/1.1\r\nHost: x\r\n"
AMBIGUOUS = {
    "content-length and transfer-encoding": HEAD
    + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "two content-lengths": HEAD
    + "Content-Length: 5\r\nContent-Length: 30\r\n\r\n"
    + "helloGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "chunk size +5": HEAD + "Transfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
    "chunk size 0x5": HEAD + "Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    "chunk size 0_5": HEAD + "Transfer-Encoding: chunked\r\n\r\n0_5\r\nhello\r\n0\r\n\r\n",
    "transfer-encoding twice": HEAD
    + "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "transfer-encoding not chunked": HEAD + "Transfer-Encoding: gzip\r\n\r\nhello",
}


@pytest.fixture
def echoes() -> Iterator[list[tuple[str, ThreadingHTTPServer]]]:
    yield from echo_servers(3)


def backends_of(servers: list[tuple[str, ThreadingHTTPServer]]) -> list[Backend]:
    return [Backend(name, "127.0.0.1", s.server_address[1]) for name, s in servers]


def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a connection of its own; everything that comes back until close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_30_ambiguous_requests_are_refused_by_the_router_itself(
    echoes: list[tuple[str, ThreadingHTTPServer]],
) -> None:
    router = RouterProcess(backends_of(echoes))
    try:
        answers = {name: raw(router.port, data.encode()) for name, data in AMBIGUOUS.items()}
        reached = sum(s.connections for _, s in echoes)  # type: ignore[attr-defined]
        after = [ask(router.port)[0] for _ in range(6)]  # the next users are served
    finally:
        router.stop()
    refused = {name for name, answer in answers.items() if answer.startswith(b"HTTP/1.1 400 ")}
    assert refused == set(AMBIGUOUS), {n: a[:40] for n, a in answers.items()}
    # One answer each, and the router's own: nothing was smuggled through to a node.
    assert all(answer.count(b"Connection: close\r\n") == 1 for answer in answers.values())
    assert reached == 0
    assert after == [200] * 6


class BrokenNode(RawNode):
    """Answers each connection's first request with a response whose body is framed
    wrong (a chunk size of +5), then one that is right: a lenient proxy would pool the
    connection and hand the stray bytes to the next user."""

    def answer(self, conn: socket.socket) -> None:
        with conn:
            served = 0
            while data := conn.recv(65536):
                if b"\r\n\r\n" not in data:
                    continue
                if served == 0:
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"+5\r\nhello\r\n0\r\n\r\n"
                    )
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                served += 1


def test_30_a_connection_that_saw_an_error_is_never_reused() -> None:
    node = BrokenNode()
    router = RouterProcess([Backend("broken", "127.0.0.1", node.port)])
    try:
        first = ask(router.port)
        second = ask(router.port)
        third = ask(router.port)
    finally:
        router.stop()
        node.close()
    assert first[0] == 502
    assert second[0] == 502 and third[0] == 502  # each on a connection of its own
    assert node.connections == 3


def test_31_half_sent_heads_and_idle_connections_are_closed(
    echoes: list[tuple[str, ThreadingHTTPServer]],
) -> None:
    """60 connections that never finish their head are closed by the header timeout
    (default 10 s); idle keep-alive ones by the idle timeout."""
    router = RouterProcess(backends_of(echoes), "--idle-timeout", "1")
    slow: list[socket.socket] = []
    idle = http.client.HTTPConnection("127.0.0.1", router.port, timeout=5)
    try:
        for n in range(60):
            sock = socket.create_connection(("127.0.0.1", router.port), timeout=40)
            sock.sendall(f"GET /{n} HTTP/1.1\r\nHost: x\r\nX-Slow: ".encode())
            slow.append(sock)
        idle.request("GET", "/")
        idle.getresponse().read()
        started = time.monotonic()
        time.sleep(1.5)
        assert idle.sock is not None and idle.sock.recv(1) == b""  # closed: idle 1 s
        assert ask(router.port)[0] == 200  # others are served meanwhile
        closed_after = []
        for sock in slow:
            sock.settimeout(max(0.1, 35 - (time.monotonic() - started)))
            try:
                while sock.recv(4096):
                    pass
            except TimeoutError:
                continue
            closed_after.append(time.monotonic() - started)
    finally:
        for sock in slow:
            sock.close()
        idle.close()
        router.stop()
    assert len(closed_after) == 60
    assert max(closed_after) < 35


def test_31_a_flood_of_slow_connections_does_not_lock_clients_out(
    echoes: list[tuple[str, ThreadingHTTPServer]],
) -> None:
    """Under a 256-descriptor limit, 300 connections that send half a head: the router
    keeps room for real clients by closing the oldest of those that only wait."""
    port = free_port()
    args = [a for b in backends_of(echoes) for a in ("--backend", b.spec)]

    listen = ["--listen", f"127.0.0.1:{port}"]
    process = subprocess.Popen(  # util-linux prlimit: the limit in the router alone
        [
            "prlimit",
            "--nofile=256:256",
            sys.executable,
            "-m",
            "statescale",
            "router",
            *args,
            *listen,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    slow: list[socket.socket] = []
    try:
        wait_until_serving(port)
        for n in range(300):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(f"GET /{n} HTTP/1.1\r\nHost: x\r\n".encode())
            slow.append(sock)
        time.sleep(0.5)
        started = time.monotonic()
        statuses = [ask(port)[0] for _ in range(20)]
        elapsed = time.monotonic() - started
    finally:
        for sock in slow:
            sock.close()
        process.terminate()
        process.wait(15)
        assert process.stderr is not None
        err = process.stderr.read().decode()
        process.stderr.close()
    assert statuses == [200] * 20
    assert elapsed < 5
    assert "at most 112 connections" in err  # (256 - 32) / 2


def test_32_the_admin_endpoint_needs_its_token_and_changes_atomically(
    echoes: list[tuple[str, ThreadingHTTPServer]],
) -> None:
    backends = backends_of(echoes)
    router = RouterProcess(backends[:1])

    def admin(method: str, query: str, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
        conn = http.client.HTTPConnection("127.0.0.1", router.admin, timeout=5)
        try:
            conn.request(method, "/nodes" + query, headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    stranger = f"?name=node1&addr=127.0.0.1:{free_port()}"
    try:
        assert admin("GET", "", {})[0] == 401
        assert admin("POST", stranger, {})[0] == 401
        assert admin("POST", stranger, {"Authorization": "Bearer not-the-token-at-all"})[0] == 403
        assert admin("DELETE", "?name=node1", {"Authorization": f"Basic {ADMIN_TOKEN}"})[0] == 403
        status, body = admin("DELETE", "?name=node1", AUTH)
        assert status == 409 and "last node" in str(body["error"])
        assert [n["name"] for n in router.nodes()["nodes"]] == ["node1"]  # type: ignore[index,union-attr]
        assert ask(router.port)[0] == 200  # still served
        status, _ = admin("POST", "?name=node2&addr=nowhere", AUTH)
        assert status == 409
        assert [n["addr"] for n in router.nodes()["nodes"]] == [backends[0].address]  # type: ignore[index,union-attr]
    finally:
        router.stop()


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        pytest.param(["--admin", "127.0.0.1:1"], {}, "STATESCALE_ADMIN_TOKEN", id="no-token"),
        pytest.param(
            ["--admin", "0.0.0.0:1"],
            {"STATESCALE_ADMIN_TOKEN": ADMIN_TOKEN},
            "loopback only",
            id="not-loopback",
        ),
        pytest.param(
            ["--admin", "127.0.0.1:1"],
            {"STATESCALE_ADMIN_TOKEN": "short"},
            "at least 16",
            id="short-token",
        ),
    ],
)
def test_32_an_admin_endpoint_that_is_not_safe_refuses_to_start(
    args: list[str], env: dict[str, str], says: str
) -> None:
    base = {k: v for k, v in os.environ.items() if k != "STATESCALE_ADMIN_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "statescale", "router", "--backend", "a=127.0.0.1:1", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 2 and says in result.stderr, result.stderr


def test_a_body_over_the_limit_is_413_and_never_reaches_a_node(
    echoes: list[tuple[str, ThreadingHTTPServer]],
) -> None:
    process = start_router(backends_of(echoes), port := free_port(), "--max-body", "1000")
    try:
        wait_until_serving(port)
        before = sum(s.connections for _, s in echoes)  # type: ignore[attr-defined]
        answer = raw(port, (HEAD + "Content-Length: 5000\r\n\r\n" + "x" * 5000).encode())
        reached = sum(s.connections for _, s in echoes) - before  # type: ignore[attr-defined]
    finally:
        process.terminate()
        process.wait(10)
    assert answer.startswith(b"HTTP/1.1 413 ") and reached == 0


class _Large(BaseHTTPRequestHandler):
    """/big: 24 MB with a Content-Length; /stream: a body of unknown length."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        if self.path == "/big":
            self.send_header("Content-Length", str(24 << 20))
            self.end_headers()
            for _ in range(24):
                self.wfile.write(b"x" * (1 << 20))
        else:
            self.send_header("Connection", "close")  # no length: the body ends at close
            self.end_headers()
            self.wfile.write(b"streamed to the end")
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def large() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Large)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_large_response_to_a_slow_reader_arrives_whole(large: ThreadingHTTPServer) -> None:
    router = RouterProcess([Backend("big", "127.0.0.1", large.server_address[1])])
    try:
        with socket.create_connection(("127.0.0.1", router.port), timeout=20) as sock:
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            time.sleep(1.0)  # the router must pause the node, then resume it
            received = 0
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
    finally:
        router.stop()
    assert received > 24 << 20  # the head and every byte of the body


def test_an_http10_client_gets_a_body_of_unknown_length_unchunked(
    large: ThreadingHTTPServer,
) -> None:
    router = RouterProcess([Backend("big", "127.0.0.1", large.server_address[1])])
    try:
        answer = raw(router.port, b"GET /stream HTTP/1.0\r\n\r\n")
        answer11 = raw(router.port, b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    finally:
        router.stop()
    assert answer.endswith(b"\r\n\r\nstreamed to the end") and b"chunked" not in answer
    assert b"Transfer-Encoding: chunked" in answer11 and answer11.endswith(b"\r\n0\r\n\r\n")


def test_31_a_head_over_the_limit_is_431_however_it_is_split(
    echoes: list[tuple[str, ThreadingHTTPServer]],
) -> None:
    router = RouterProcess(backends_of(echoes))
    try:
        huge = "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + "y" * 300_000 + "\r\n\r\n"
        answer = raw(router.port, huge.encode())
        reached = sum(s.connections for _, s in echoes)  # type: ignore[attr-defined]
    finally:
        router.stop()
    assert answer.startswith(b"HTTP/1.1 431 ") and reached == 0


# -- what an independent review found (each test failed on the code before) -------------


class _DiesAfterAPost(RawNode):
    """Keeps connections alive; runs a POST, then closes unanswered (a worker killed
    mid-request)."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while (got := next_head(conn, buffer)) is not None:
                head, buffer = got
                line = head.split(b"\r\n")[0]
                self.seen.append(line)
                if line.startswith(b"POST"):
                    return  # ran it, died before answering
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def test_a_request_that_may_have_run_is_never_sent_twice() -> None:
    # RFC 9110 9.2.2: a bodiless POST on a kept-alive connection the node then closed
    # unanswered was sent again, and ran twice.
    node = _DiesAfterAPost()
    router = RouterProcess([Backend("n", "127.0.0.1", node.port)])
    try:
        assert ask(router.port)[0] == 200  # a pooled connection to the node
        conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)
        conn.request("POST", "/charge?amount=100")
        status = conn.getresponse().status
        conn.close()
    finally:
        router.stop()
        node.close()
    assert status == 502
    assert node.seen.count(b"POST /charge?amount=100 HTTP/1.1") == 1


def test_31_blank_lines_do_not_hold_a_connection_open(
    echoes: list[tuple[str, ThreadingHTTPServer]],
) -> None:
    # llhttp skips CRLFs before a request without starting one; each re-armed the head's
    # deadline, so a CRLF every 0.7 s held a connection for good.
    router = RouterProcess(backends_of(echoes), "--idle-timeout", "2", "--header-timeout", "1")
    try:
        with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
            started = time.monotonic()
            closed = None
            while time.monotonic() - started < 8:
                try:
                    sock.sendall(b"\r\n")
                except OSError:
                    closed = time.monotonic() - started
                    break
                sock.settimeout(0.7)
                try:
                    if sock.recv(1) == b"":
                        closed = time.monotonic() - started
                        break
                except TimeoutError:
                    pass
    finally:
        router.stop()
    assert closed is not None and closed < 5


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


class _Slow(RawNode):
    def answer(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            time.sleep(6)
            with contextlib.suppress(OSError):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def test_31_what_a_client_sends_behind_a_slow_request_waits_in_its_socket() -> None:
    # The router read and parsed all a client sent: a request pipelined behind one still
    # at its node took 1.5 GB of the router's memory in 2 s. It stops reading instead.
    node = _Slow()
    router = RouterProcess([Backend("n", "127.0.0.1", node.port)])
    try:
        before = _rss_mb(router.process.pid)
        with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
            sock.setblocking(False)
            sent, block, started = 0, b"x" * 65536, time.monotonic()
            while sent < 300_000_000 and time.monotonic() - started < 3:
                try:
                    sent += sock.send(block)
                except BlockingIOError:
                    time.sleep(0.01)
            grown = _rss_mb(router.process.pid) - before
    finally:
        router.stop()
        node.close()
    assert sent < 100_000_000, sent  # the router stopped reading...
    assert grown < 48, grown  # ...and holds little of it


def _slow_bodies(port: int, count: int) -> list[socket.socket]:
    """``count`` connections each sending a request head whose body then trickles."""
    slow = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nx")
        slow.append(sock)
    return slow


def _closed(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def test_31_slow_bodies_cannot_hold_the_connection_cap(
    echoes: list[tuple[str, ThreadingHTTPServer]],
) -> None:
    # Bodies sent a byte now and then filled every slot: every other client got a 503
    # for as long as they trickled. At the cap, the slowest body (under the minimum
    # rate) makes room; and past the body timeout such a body ends its connection.
    router = RouterProcess(backends_of(echoes), "--max-connections", "4", "--body-timeout", "1")
    slow = _slow_bodies(router.port, 4)
    try:
        time.sleep(1.2)  # each now averages under a byte a second
        served = [ask(router.port)[0] for _ in range(4)]
        late = _slow_bodies(router.port, 1)[0]
        slow.append(late)
        time.sleep(1.5)
        late.sendall(b"x")  # a piece in time for the timeout between two, too slow all told
        assert _closed(late, 5)
    finally:
        for sock in slow:
            sock.close()
        router.stop()
    assert served == [200] * 4
