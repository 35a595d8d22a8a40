"""Peer-to-peer balancing: httpx clients with StickyTransport against registered nodes
and no balancer at all."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from benchmarks.rig.harness import Gunicorn, registered_node
from statescale import client
from statescale.client import AsyncStickyTransport, StickyTransport
from statescale.exceptions import ConfigError
from statescale.processes import free_port
from statescale.routing.backends import Backend
from statescale.routing.membership import open_registry
from statescale.signing import routing_key
from tests.stores.redis.tls import certificates

pytestmark = pytest.mark.integration


def _increments(transport: httpx.BaseTransport, times: int) -> tuple[list[int], set[int]]:
    values, pids = [], set()
    with httpx.Client(transport=transport, base_url="http://statescale") as client:
        for _ in range(times):
            body = client.post("/api/incr?key=p").raise_for_status().json()
            values.append(body["value"])
            pids.add(body["pid"])
    return values, pids


def test_twenty_clients_reach_their_sessions_owners_directly(redis_url: str) -> None:
    registry = f"{redis_url}?prefix=p2p-{time.monotonic_ns()}"
    with ExitStack() as stack:
        nodes = [registered_node(stack, registry, f"node{i}", workers=2) for i in (1, 2, 3)]
        transports = [StickyTransport(registry=registry) for _ in range(20)]
        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(lambda t: _increments(t, 20), transports))
        for transport in transports:
            transport.close()
        served = set().union(*(pids for _, pids in results))
        assert all(served & n.worker_pids() for n in nodes)  # spread over the nodes
    assert [values for values, _ in results] == [list(range(1, 21))] * 20
    assert all(len(pids) == 1 for _, pids in results)  # one worker served each session


def _owner_runs(
    transport: StickyTransport, nodes: dict[str, Gunicorn], runs: int
) -> list[tuple[str, str, list[int]]]:
    """``runs`` new sessions of 5 increments each: for each, the session's key on the
    client's ring, the node that served it, and the values."""
    out = []
    for _ in range(runs):
        with httpx.Client(transport=transport, base_url="http://statescale") as client:
            values, served = [], set()
            for _ in range(5):
                body = client.post("/api/incr?key=p").raise_for_status().json()
                values.append(body["value"])
                served |= {n for n, node in nodes.items() if body["pid"] in node.worker_pids()}
            cookie = client.cookies.get("statescale")
        assert cookie is not None and len(served) == 1
        out.append((routing_key(cookie), served.pop(), values))
    return out


def test_a_refused_connection_goes_to_the_next_owner(redis_url: str) -> None:
    """A fixed list with a node that is not there: a session it would own goes to its
    next owner on the ring, which is the node that minted it (the nodes' ring knows no
    such node), and stays there. Two live nodes, so that any other choice (round
    robin, the wrong owner) would start the session afresh on the other one."""
    registry = f"{redis_url}?prefix=p2p-dead-{time.monotonic_ns()}"
    with ExitStack() as stack:
        nodes = {name: registered_node(stack, registry, name) for name in ("n1", "n2")}
        dead = f"dead=127.0.0.1:{free_port()}"
        live = [f"{name}=127.0.0.1:{node.port}" for name, node in nodes.items()]
        transport = StickyTransport(backends=[*live, dead])
        ring = transport.routes.current[0]
        runs: list[tuple[str, str, list[int]]] = []
        while sum(ring.owner(key) == "dead" for key, _, _ in runs) < 3:  # 1 in 3 or so
            assert len(runs) < 60
            runs += _owner_runs(transport, nodes, 1)
        transport.close()
    for key, served, values in runs:
        assert values == [1, 2, 3, 4, 5]
        assert served == ring.owner(key, ["dead"])  # the owner, or the next one


def test_a_connection_never_accepted_goes_to_the_next_owner(redis_url: str) -> None:
    """A node whose host does not answer at all (its listen queue full: the SYN is
    dropped, as for a host powered off) costs one connect timeout, then the next owner
    serves, and the node is skipped for the next requests. Nothing was sent to it."""
    registry = f"{redis_url}?prefix=p2p-hole-{time.monotonic_ns()}"
    with ExitStack() as stack:
        nodes = {name: registered_node(stack, registry, name) for name in ("n1", "n2")}
        hole = stack.enter_context(socket.socket())
        hole.bind(("127.0.0.1", 0))
        hole.listen(0)
        for _ in range(3):  # fill its queue; connect() past it gets no answer
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(hole.getsockname())
        live = [f"{name}=127.0.0.1:{node.port}" for name, node in nodes.items()]
        transport = StickyTransport(backends=[*live, f"hole=127.0.0.1:{hole.getsockname()[1]}"])
        ring = transport.routes.current[0]
        timeout = httpx.Timeout(5.0, connect=0.5)
        for _ in range(60):
            with httpx.Client(
                transport=transport, base_url="http://statescale", timeout=timeout
            ) as c:
                c.post("/api/incr?key=p").raise_for_status()
                cookie = c.cookies.get("statescale")
                assert cookie is not None
                if ring.owner(routing_key(cookie)) != "hole":
                    continue
                values = [c.post("/api/incr?key=p").json()["value"]]  # one timeout
                started = time.monotonic()
                values += [c.post("/api/incr?key=p").json()["value"] for _ in range(2)]
                took = time.monotonic() - started
                break
        else:
            raise AssertionError("no session the hole owns in 60")
        transport.close()
    assert values == [2, 3, 4]  # on at the owner's next owner, the node that minted it
    assert took < 0.5  # the hole skipped since: no second connect timeout


def test_the_async_transport_routes_the_same(redis_url: str) -> None:
    registry = f"{redis_url}?prefix=p2p-async-{time.monotonic_ns()}"

    async def user() -> list[int]:
        transport = AsyncStickyTransport(registry=registry)
        async with httpx.AsyncClient(transport=transport, base_url="http://statescale") as c:
            return [(await c.post("/api/incr?key=a")).json()["value"] for _ in range(10)]

    with ExitStack() as stack:
        for i in (1, 2):
            registered_node(stack, registry, f"node{i}")

        async def users() -> list[list[int]]:
            return list(await asyncio.gather(*(user() for _ in range(5))))

        assert asyncio.run(users()) == [list(range(1, 11))] * 5


def test_the_transport_says_what_it_needs() -> None:
    with pytest.raises(ConfigError, match="registry=URL or backends"):
        StickyTransport()
    with pytest.raises(ConfigError, match="NAME=HOST:PORT"):
        StickyTransport(backends=["nonsense"])
    with pytest.raises(ConfigError, match="scheme must be one of"):
        StickyTransport(backends=["a=127.0.0.1:1"], scheme="ftp")


def test_nodes_that_serve_tls_are_reached_over_https() -> None:
    seen: list[httpx.URL] = []
    carrier = httpx.MockTransport(lambda request: seen.append(request.url) or httpx.Response(200))
    transport = StickyTransport(backends=["a=10.0.0.1:8443"], scheme="https", transport=carrier)
    with httpx.Client(transport=transport, base_url="https://app.example") as c:
        c.get("/x")
    assert [str(url) for url in seen] == ["https://10.0.0.1:8443/x"]


def test_the_nodes_skipped_are_only_those_that_refused_lately() -> None:
    transport = StickyTransport(backends=["a=127.0.0.1:1"], retry_after=0.0)
    for n in range(1000):  # names come and go (a rollout's pods): none is kept for good
        transport.routes.refused(Backend.parse(f"pod-{n}=127.0.0.1:1"))
    assert len(transport.routes._down) <= 1
    transport.close()


def test_the_client_routes_by_the_cookie_value_the_routers_route_by() -> None:
    # An independent review: junk under the cookie's name before the signed value sent
    # the request to the junk's node, where the session started afresh.
    from statescale.routing.router.proxy import cookie_value as routers

    transport = StickyTransport(backends=["a=127.0.0.1:1", "b=127.0.0.1:2", "c=127.0.0.1:3"])
    header = "statescale=junk1; statescale=ID1xxxxxxxxxxxxxxxxxxxx.SIGsigsig"
    request = httpx.Request("GET", "http://app/", headers={"Cookie": header})
    routed = routers(header.encode(), b"statescale")
    assert routed is not None
    assert transport.routes._session(request) == routed.partition(".")[0]
    transport.close()


def test_the_async_transport_does_not_block_its_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Made in a coroutine, with a registry that cannot be read: the constructor
    returns at once (it blocked the loop for 10 s), and the first requests say why,
    having taken no thread while they waited (each took one of the loop's executor)."""
    monkeypatch.setattr(client, "FIRST_MEMBERSHIP", 1.0)
    ticks: list[float] = []
    threads: list[int] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            threads.append(threading.active_count())
            await asyncio.sleep(0.02)

    async def main() -> list[str]:
        beat = asyncio.create_task(ticker())
        started = time.monotonic()
        transport = AsyncStickyTransport(registry=f"redis://127.0.0.1:{free_port()}/0")
        assert time.monotonic() - started < 0.5
        await asyncio.sleep(0.1)  # (the follower's thread has started)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
                found = await asyncio.gather(
                    *(c.get("/") for _ in range(40)), return_exceptions=True
                )
        finally:
            beat.cancel()
        return [str(exc) if isinstance(exc, ConfigError) else repr(exc) for exc in found]

    messages = asyncio.run(main())
    assert len(messages) == 40
    for message in messages:
        assert "registry cannot be read" in message and "Connection refused" in message
    assert max(b - a for a, b in itertools.pairwise(ticks)) < 0.5  # the loop went on
    assert max(threads) == threads[0]  # none more while they waited


def test_a_transport_made_before_a_fork_follows_the_registry_in_the_child(
    redis_url: str,
) -> None:
    registry = f"{redis_url}?prefix=p2p-fork-{time.monotonic_ns()}"
    writer = open_registry(registry)
    writer.register(Backend("a", "127.0.0.1", 1), ttl=30, token="t-a")
    transport = StickyTransport(registry=registry)
    reader, child_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a member registered after the fork must reach its ring
        code = 1
        try:
            with contextlib.suppress(httpx.ConnectError):  # (no node listens): it adopts
                transport.handle_request(httpx.Request("GET", "http://app/"))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if transport.routes.current[0].names == ("a", "b"):
                    code = 0
                    break
                time.sleep(0.05)
        finally:
            os.write(child_end, bytes([code]))
            os._exit(code)
    os.close(child_end)
    try:
        writer.register(Backend("b", "127.0.0.1", 2), ttl=30, token="t-b")
        _, status = os.waitpid(pid, 0)
        assert os.read(reader, 1) == b"\x00"
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(reader)
        transport.close()
        writer.close()


@contextmanager
def _https_node(tmp_path: Path, names: tuple[str, ...]) -> Iterator[tuple[int, ssl.SSLContext]]:
    """A node serving https on 127.0.0.1 with a certificate for ``names``; its port,
    and a client context that trusts the certificate's CA."""
    certs = certificates(tmp_path / "tls", names)

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(certs.cert, certs.key)
    server.socket = served.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], ssl.create_default_context(cafile=str(certs.ca))
    finally:
        server.shutdown()
        server.server_close()


def test_https_nodes_are_checked_against_the_requests_host(tmp_path: Path) -> None:
    # An independent review: the node's address replaced the host in the URL, so TLS
    # checked the certificate against the IP ("IP address mismatch"), and that
    # refusal, a ConnectError, skipped the node as if it were down.
    with _https_node(tmp_path, ("DNS:app.internal",)) as (port, trusted):
        transport = StickyTransport(
            backends=[f"a=127.0.0.1:{port}", f"b=localhost:{port}"],
            scheme="https",
            transport=httpx.HTTPTransport(verify=trusted),
        )
        with httpx.Client(transport=transport, base_url="https://app.internal") as c:
            assert c.get("/").text == "ok"
        with (
            httpx.Client(transport=transport, base_url="https://elsewhere.internal") as c,
            pytest.raises(httpx.ConnectError, match=r"(?i)certificate"),
        ):
            c.get("/")  # a configuration to fix: raised, not failed over...
        assert transport.routes._down == {}  # ...and no node taken for down
        transport.close()


def test_a_node_that_closes_at_once_is_failed_over_not_raised(tmp_path: Path) -> None:
    # Every TLS error was raised as a certificate to fix: a node that accepts and
    # closes (it is stopping) failed half the requests instead of being skipped.
    closing = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def close_each() -> None:
        closing.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = closing.accept()
                conn.close()
            except OSError:
                continue

    threading.Thread(target=close_each, daemon=True).start()
    with _https_node(tmp_path, ("DNS:app.internal",)) as (port, trusted):
        transport = StickyTransport(
            backends=[f"a=127.0.0.1:{closing.getsockname()[1]}", f"b=127.0.0.1:{port}"],
            scheme="https",
            transport=httpx.HTTPTransport(verify=trusted),
        )
        with httpx.Client(transport=transport, base_url="https://app.internal") as c:
            assert [c.get("/").text for _ in range(4)] == ["ok"] * 4
        assert set(transport.routes._down) == {"a"}
        transport.close()
    stop.set()
    closing.close()


def test_several_cookie_lines_are_read_as_the_nodes_read_them() -> None:
    transport = StickyTransport(backends=["a=127.0.0.1:1", "b=127.0.0.1:2"])
    signed = "ID1xxxxxxxxxxxxxxxxxxxx.SIGsigsig"

    def session(*lines: str) -> str | None:
        request = httpx.Request("GET", "http://app/", headers=[("Cookie", v) for v in lines])
        return transport.routes._session(request)

    assert session(f"statescale={signed}", "b=1") == "ID1xxxxxxxxxxxxxxxxxxxx"
    assert session("a=1", f"statescale={signed}") is None  # gunicorn: "a=1, statescale=..."
    transport.close()


def test_a_transport_used_before_a_fork_gets_a_pool_of_its_own_in_the_child() -> None:
    # An independent review: the child inherited the parent's keep-alive sockets, and
    # once read another process's reply to its own request.
    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the pool keeps the connection

        def do_GET(self) -> None:
            body = f"{self.path} {self.client_address[1]}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    transport = StickyTransport(backends=[f"a=127.0.0.1:{server.server_address[1]}"])
    client = httpx.Client(transport=transport, base_url="http://app")
    parents = client.get("/parent").text.split()[1]  # the parent's pooled connection
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            path, port = client.get("/child").text.split()
            code = 0 if path == "/child" and port != parents else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # its own connection, its own answer
    assert client.get("/parent-again").text.split() == ["/parent-again", parents]
    client.close()
    server.shutdown()
    server.server_close()


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


def test_threads_of_a_forked_child_make_one_pool_and_one_follower_between_them(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two threads of a child each took the transport for their own: each made a pool
    # and started following the registry, and one of each was left behind running.
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    registry = f"{redis_url}?prefix=p2p-fork-threads-{time.monotonic_ns()}"
    writer = open_registry(registry)
    writer.register(Backend("a", "127.0.0.1", server.server_address[1]), ttl=30, token="t")
    transport = StickyTransport(registry=registry)
    made = {"carriers": 0, "followers": 0}
    carrier, follow = transport._carrier, transport.routes._start_following

    def slow_carrier() -> httpx.HTTPTransport:
        made["carriers"] += 1
        time.sleep(0.2)  # the other thread arrives meanwhile
        return carrier()

    def counted_follow() -> None:
        made["followers"] += 1
        follow()

    monkeypatch.setattr(transport, "_carrier", slow_carrier)
    monkeypatch.setattr(transport.routes, "_start_following", counted_follow)
    client = httpx.Client(transport=transport, base_url="http://app")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            start = threading.Barrier(2)
            answers: list[int] = []

            def get() -> None:
                start.wait()
                answers.append(client.get("/").status_code)

            threads = [threading.Thread(target=get) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            code = 0 if answers == [200, 200] and made == {"carriers": 1, "followers": 1} else 2
        finally:
            os._exit(code)
    try:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        client.close()
        writer.close()
        server.shutdown()
        server.server_close()
