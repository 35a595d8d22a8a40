"""The built-in router as a real process, in front of real HTTP servers and real
gunicorn nodes."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from benchmarks.rig.harness import (
    SessionClient,
    interleaved_increments,
    sticky_nodes,
)
from statescale.processes import free_port
from statescale.routing import balancers
from statescale.routing.backends import Backend
from tests.routing.echo import Echo, RawNode, RouterProcess, ask, echo_servers, kill, next_head

pytestmark = pytest.mark.integration


@pytest.fixture
def echoes() -> Iterator[list[tuple[str, ThreadingHTTPServer]]]:
    yield from echo_servers(3)


def backends_of(servers: list[tuple[str, ThreadingHTTPServer]]) -> list[Backend]:
    return [Backend(name, "127.0.0.1", s.server_address[1]) for name, s in servers]


def test_proxying_keepalive_bodies_and_forwarded_headers(
    echoes: list[tuple[str, ThreadingHTTPServer]],
) -> None:
    router = RouterProcess(backends_of(echoes))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=5)
        seen = set()
        for i in range(6):  # one client connection, kept alive, round robin without a cookie
            conn.request("POST", "/x", body=f"payload {i}".encode())
            reply = json.loads(conn.getresponse().read())
            assert reply["body"] == f"payload {i}" and reply["proto"] == "http"
            assert reply["xff"] == "127.0.0.1"
            seen.add(reply["node"])
        assert seen == {"node1", "node2", "node3"}
        conn.request("POST", "/x", body=iter([b"chunked ", b"upload"]), encode_chunked=True)
        assert json.loads(conn.getresponse().read())["body"] == "chunked upload"
        conn.request("GET", "/chunked")
        assert conn.getresponse().read() == b"hello chunked world"
    finally:
        err = router.stop()  # with the client's keep-alive connection still open
        conn.close()
    assert "stopping; 0 requests in flight" in err


def test_a_router_leaving_for_good_serves_until_connections_cease(
    echoes: list[tuple[str, ThreadingHTTPServer]],
) -> None:
    """SIGUSR1 (what a node's master sends when it leaves its fleet): the router goes
    on serving while requests keep coming (a balancer still reloading sends some), on
    new connections or on one kept alive, and stops by itself once none has come for
    QUIET seconds."""
    from statescale.routing.router.serve import QUIET

    router = RouterProcess(backends_of(echoes))
    kept = http.client.HTTPConnection("127.0.0.1", router.port, timeout=5)
    kept.request("GET", "/")
    assert kept.getresponse().read()
    router.process.send_signal(signal.SIGUSR1)
    for _ in range(5):  # new connections
        assert ask(router.port)[0] == 200
        time.sleep(QUIET / 5)
    for _ in range(4):  # then only the one kept alive, spanning more than QUIET
        kept.request("GET", "/")
        assert kept.getresponse().read()
        time.sleep(QUIET * 0.8)
    assert router.process.poll() is None
    kept.close()
    quiet = time.monotonic()
    assert router.process.wait(10) == 0
    assert time.monotonic() - quiet < 2 * QUIET + 1
    assert router.process.stderr is not None
    assert "stopping; 0 requests in flight" in router.process.stderr.read().decode()
    router.process.stderr.close()


def test_a_cookie_goes_to_its_owner_and_a_dead_node_is_routed_around(
    echoes: list[tuple[str, ThreadingHTTPServer]],
) -> None:
    backends = backends_of(echoes)
    ring = balancers.get("statescale").ring(backends)
    router = RouterProcess(backends)
    try:
        sessions = [f"session{i:03d}.sig" for i in range(60)]
        for sid in sessions:
            node = json.loads(ask(router.port, sid)[1])["node"]
            assert node == ring.owner(sid.partition(".")[0])
        kill(echoes[0][1])  # node1 now refuses connections
        for sid in sessions:
            node = json.loads(ask(router.port, sid)[1])["node"]
            assert node == ring.owner(sid.partition(".")[0], down=("node1",))
        assert {n["name"]: n["up"] for n in router.nodes()["nodes"]} == {
            "node1": False,
            "node2": True,
            "node3": True,
        }  # type: ignore[index,union-attr]
    finally:
        err = router.stop()
    assert "node1 is down" in err


def test_a_node_that_never_accepts_is_taken_out_after_the_connect_timeout(
    echoes: list[tuple[str, ThreadingHTTPServer]],
) -> None:
    # A listener whose accept queue is full and who never accepts: the kernel drops
    # further SYNs, so a connect to it hangs (a frozen or overloaded machine).
    stuck = socket.socket()
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(stuck.getsockname())
        fillers.append(filler)
    time.sleep(0.2)
    backends = [Backend("node1", *stuck.getsockname()), *backends_of(echoes[1:])]
    ring = balancers.get("statescale").ring(backends)
    sid = next(f"s{i}.sig" for i in range(1000) if ring.owner(f"s{i}") == "node1")
    router = RouterProcess(backends)
    try:
        started = time.monotonic()
        status, body = ask(router.port, sid)
        waited = time.monotonic() - started
        assert status == 200
        assert json.loads(body)["node"] == ring.owner(sid.partition(".")[0], down=("node1",))
        assert 0.9 < waited < 4.5  # the 1 s connect timeout (swept every 0.25 s), once
        status, _ = ask(router.port, sid)  # node1 is out now: no wait at all
        assert status == 200
        assert {n["name"]: n["up"] for n in router.nodes()["nodes"]}["node1"] is False  # type: ignore[index,union-attr]
    finally:
        err = router.stop()
        for filler in fillers:
            filler.close()
        stuck.close()
    assert "node1 is down (TimeoutError)" in err


class ClosingNode(RawNode):
    """A node that answers each request and says whether it saw the router's side of the
    connection end right after the request (a half-close) before it answered.
    ``keep_alive``: it keeps connections for more requests instead of closing."""

    def __init__(
        self, keep_alive: bool = False, aborts: bool = False, close_every: int = 0
    ) -> None:
        self.keep_alive = keep_alive
        self.aborts = aborts  # takes a half-close for an abort: closes unanswered
        self.close_every = close_every  # with keep_alive: close after every n-th answer
        self.seen_eof: list[bool] = []
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            while (got := next_head(conn, buffer)) is not None:
                buffer = got[1]
                conn.settimeout(0.3)  # a half-close is there at once; else none comes
                try:
                    self.seen_eof.append(conn.recv(1) == b"")
                except TimeoutError:
                    self.seen_eof.append(False)
                conn.settimeout(None)
                if self.aborts and self.seen_eof[-1]:
                    return
                keep = self.keep_alive and not (
                    self.close_every and len(self.seen_eof) % self.close_every == 0
                )
                close = b"" if keep else b"Connection: close\r\n"
                conn.sendall(b"HTTP/1.1 200 OK\r\n" + close + b"Content-Length: 2\r\n\r\nok")
                if not keep:
                    return


def through_router(
    nodes: list[ClosingNode], *extra: str, requests: int, method: str = "GET"
) -> tuple[list[tuple[int, bytes]], str]:
    """``requests`` requests without a cookie (round robin) through a router in front of
    ``nodes``: their answers, and the router's log."""
    backends = [Backend(f"node{i}", "127.0.0.1", n.port) for i, n in enumerate(nodes, 1)]
    router = RouterProcess(backends, *extra)
    answers = []
    try:
        for _ in range(requests):
            conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=5)
            conn.request(method, "/")
            response = conn.getresponse()
            answers.append((response.status, response.read()))
            conn.close()
    finally:
        err = router.stop()
        for node in nodes:
            node.close()
    return answers, err


@pytest.mark.parametrize("half_close", [True, False])
def test_a_node_that_closes_after_each_response_gets_its_requests_half_closed(
    half_close: bool,
) -> None:
    node = ClosingNode()
    requests = 68 if half_close else 5  # (each request not half-closed waits 0.3 s)
    answers, _ = through_router(
        [node], *(() if half_close else ("--no-half-close",)), requests=requests
    )
    assert answers == [(200, b"ok")] * requests
    if half_close:
        # Three closing responses in a row show the node closes; from then on each
        # request is half-closed, but for one in 64 that asks again (the 67th).
        assert node.seen_eof == [False] * 3 + [True] * 63 + [False, True]
    else:
        assert node.seen_eof == [False] * requests


def test_a_node_that_keeps_connections_is_never_half_closed() -> None:
    node = ClosingNode(keep_alive=True)
    answers, _ = through_router([node], requests=5)
    assert answers == [(200, b"ok")] * 5
    assert node.seen_eof == [False] * 5
    assert node.connections == 1  # one connection, kept and reused


def test_a_keep_alive_node_that_closes_now_and_then_is_not_taken_for_a_closing_one() -> None:
    node = ClosingNode(keep_alive=True, close_every=2)  # a request limit, say
    answers, _ = through_router([node], requests=8)
    assert answers == [(200, b"ok")] * 8
    assert node.seen_eof == [False] * 8


def test_a_node_that_takes_a_half_close_for_an_abort_gets_none_again() -> None:
    node = ClosingNode(aborts=True)  # as nginx does, with keep-alive off, on proxied requests
    answers, err = through_router([node], requests=6)
    assert answers == [(200, b"ok")] * 6  # GET: the refused one went again, whole
    assert node.seen_eof == [False] * 3 + [True] + [False] * 3
    assert "node1 closed a half-closed request unanswered" in err


def test_a_refused_half_close_of_an_unsafe_request_is_a_502_never_a_second_try() -> None:
    node = ClosingNode(aborts=True)
    answers, _ = through_router([node], requests=5, method="POST")
    assert answers[:3] + answers[4:] == [(200, b"ok")] * 4
    assert answers[3][0] == 502
    assert node.seen_eof == [False] * 3 + [True, False]  # the POST reached it once


def test_a_request_refused_by_one_node_and_then_another_still_gets_its_answer() -> None:
    nodes = [ClosingNode(aborts=True), ClosingNode(aborts=True)]  # round robin, no cookie
    answers, _ = through_router(nodes, requests=10)
    assert answers == [(200, b"ok")] * 10
    assert sum(n.seen_eof.count(True) for n in nodes) == 2  # one refusal each, then none


def test_connections_to_a_node_are_kept_alive_and_a_stale_one_is_replaced(
    echoes: list[tuple[str, ThreadingHTTPServer]],
) -> None:
    backends = backends_of(echoes)
    ring = balancers.get("statescale").ring(backends)
    sid = next(f"s{i}" for i in range(100) if ring.owner(f"s{i}") == "node2")
    node2 = echoes[1][1]
    router = RouterProcess(backends)
    try:
        for _ in range(10):  # ten client connections, one after the other
            status, body = ask(router.port, sid + ".sig")
            assert status == 200 and json.loads(body)["node"] == "node2"
        assert node2.connections == 1  # type: ignore[attr-defined]
        # The node drops its idle connections (a restart, a keep-alive timeout):
        # the router notices on the next request and sends it again on a new one.
        kill(node2)
        replacement = ThreadingHTTPServer(("127.0.0.1", node2.server_address[1]), Echo)
        replacement.name, replacement.connections = "node2", 0  # type: ignore[attr-defined]
        replacement.open = set()  # type: ignore[attr-defined]
        threading.Thread(target=replacement.serve_forever, daemon=True).start()
        try:
            status, body = ask(router.port, sid + ".sig")
            assert status == 200 and json.loads(body)["node"] == "node2"
            assert replacement.connections == 1  # type: ignore[attr-defined]
        finally:
            replacement.shutdown()
            replacement.server_close()
    finally:
        router.stop()


def test_no_node_left_is_a_clear_503(echoes: list[tuple[str, ThreadingHTTPServer]]) -> None:
    router = RouterProcess([Backend("gone", "127.0.0.1", free_port())])
    try:
        status, body = ask(router.port)
        assert status == 503 and b"no backend node" in body
    finally:
        router.stop()


def test_admin_adds_and_removes_nodes_and_sighup_rereads_the_file(
    echoes: list[tuple[str, ThreadingHTTPServer]], tmp_path: Path
) -> None:
    backends = backends_of(echoes)
    listing = tmp_path / "backends"
    listing.write_text(backends[0].spec + "\n")
    router = RouterProcess([], "--backends-file", str(listing))
    try:
        assert [n["name"] for n in router.nodes()["nodes"]] == ["node1"]  # type: ignore[index,union-attr]
        name, addr = backends[1].name, backends[1].address
        router.nodes("POST", f"?name={name}&addr={addr}")
        assert [n["name"] for n in router.nodes()["nodes"]] == ["node1", "node2"]  # type: ignore[index,union-attr]
        router.nodes("DELETE", "?name=node1")
        assert [n["name"] for n in router.nodes()["nodes"]] == ["node2"]  # type: ignore[index,union-attr]
        listing.write_text("\n".join(b.spec for b in backends) + "\n")
        os.kill(router.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 5
        while len(router.nodes()["nodes"]) != 3 and time.monotonic() < deadline:  # type: ignore[arg-type]
            time.sleep(0.05)
        assert len(router.nodes()["nodes"]) == 3  # type: ignore[arg-type]
    finally:
        router.stop()


def test_50_sessions_40_increments_through_the_router() -> None:
    with ExitStack() as stack:
        _, backends = sticky_nodes(stack)
        router = RouterProcess(backends)
        stack.callback(router.stop)
        seen = interleaved_increments(router.port, users=50, rounds=40)
    assert seen.wrong == []
    assert seen.one_node_each  # the first request already on the owner
    assert len(set().union(*seen.pids.values())) == 4


def test_kill9_of_one_node_loses_only_its_sessions() -> None:
    with ExitStack() as stack:
        nodes, backends = sticky_nodes(stack)
        router = RouterProcess(backends)
        stack.callback(router.stop)
        users = [SessionClient(router.port) for _ in range(40)]
        for _ in range(5):
            for user in users:
                assert user.post("/api/incr?key=c").status == 200
        victim = nodes[0]
        assert victim.process is not None
        victim_pids = victim.worker_pids() | {victim.process.pid}
        for pid in victim_pids:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        statuses, afresh, kept = [], 0, 0
        for user in users:
            reply = user.post("/api/incr?key=c")
            statuses.append(reply.status)
            if reply.status == 200:
                afresh += reply.json["value"] == 1
                kept += reply.json["value"] == 6
        victim.process.wait(10)  # reap the master; stop() then has nothing left to do
    assert statuses == [200] * 40  # never a failed request: the router routes around
    assert afresh + kept == 40
    assert 4 <= afresh <= 20  # about a quarter start afresh; the rest keep their values


def test_a_node_that_comes_back_takes_its_sessions_back(
    echoes: list[tuple[str, ThreadingHTTPServer]],
) -> None:
    backends = backends_of(echoes)
    ring = balancers.get("statescale").ring(backends)
    sid = next(f"s{i}" for i in range(200) if ring.owner(f"s{i}") == "node1")
    router = RouterProcess(backends)
    try:
        port = echoes[0][1].server_address[1]
        kill(echoes[0][1])
        moved = json.loads(ask(router.port, sid + ".x")[1])["node"]
        assert moved == ring.owner(sid, down=("node1",))
        back = ThreadingHTTPServer(("127.0.0.1", port), Echo)
        back.name, back.connections, back.open = "node1", 0, set()  # type: ignore[attr-defined]
        threading.Thread(target=back.serve_forever, daemon=True).start()
        try:
            deadline = time.monotonic() + 3  # checks every 0.2 s here (1 s by default)
            node = moved
            while node != "node1" and time.monotonic() < deadline:
                time.sleep(0.1)
                node = json.loads(ask(router.port, sid + ".x")[1])["node"]
            assert node == "node1"  # flipped back to its owner
        finally:
            back.shutdown()
            back.server_close()
    finally:
        err = router.stop()
    assert "node1 is back" in err


def test_ip_hash_sends_a_client_without_a_session_to_one_node(
    echoes: list[tuple[str, ThreadingHTTPServer]],
) -> None:
    backends = backends_of(echoes)
    ring = balancers.get("statescale").ring(backends)
    router = RouterProcess(backends, "--ip-hash")
    try:
        nodes = {json.loads(ask(router.port)[1])["node"] for _ in range(12)}
    finally:
        router.stop()
    assert nodes == {ring.owner("127.0.0.1")}


class _KeepAliveRacer(RawNode):
    """A node whose keep-alive closes a connection idle for ``idle`` seconds just as the
    next request arrives on it: that request is reset unanswered (gunicorn's 2 s
    keep-alive racing a router that reuses the connection)."""

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.answered = 0
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        with conn:
            buffer, last = b"", time.monotonic()
            while (got := next_head(conn, buffer)) is not None:
                buffer = got[1]
                if time.monotonic() - last > self.idle:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return  # closed with the request unread: a reset
                self.answered += 1
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                last = time.monotonic()


def test_a_pooled_connection_is_not_kept_past_the_nodes_keep_alive() -> None:
    # A POST (which cannot go again) on a connection the node was just closing got a
    # 502 (CI's registry test saw one); the router now drops connections idle 1 s.
    node = _KeepAliveRacer(idle=1.2)
    router = RouterProcess([Backend("node1", "127.0.0.1", node.port)])
    try:
        statuses = []
        for pause in (0.0, 0.1, 1.4):
            time.sleep(pause)
            conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=5)
            conn.request("POST", "/", body=b"")
            statuses.append(conn.getresponse().status)
            conn.close()
    finally:
        router.stop()
        node.close()
    assert statuses == [200, 200, 200] and node.answered == 3
