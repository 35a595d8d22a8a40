"""Real nginx and HAProxy, run with the generated configurations in front of real HTTP
backends: every sampled session cookie lands where the replica ring predicts."""

from __future__ import annotations

import base64
import http.client
import random
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from benchmarks.rig.harness import start_balancer
from statescale.processes import free_port
from statescale.routing import balancers
from statescale.routing.backends import Backend

pytestmark = pytest.mark.integration


class _Named(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.name.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        # the Cookie lines as gunicorn joins them: what the app reads
        self.send_header("X-Cookie", ", ".join(self.headers.get_all("Cookie") or []))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def backends() -> Iterator[dict[str, Backend]]:
    """Five HTTP servers, each answering with its name."""
    servers = []
    found = {}
    for i in range(1, 6):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Named)
        server.name = f"node{i}"  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        found[f"node{i}"] = Backend(f"node{i}", "127.0.0.1", server.server_address[1])
    yield found
    for server in servers:
        server.shutdown()
        server.server_close()


def sample_cookies(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        base64.urlsafe_b64encode(rng.randbytes(32)).rstrip(b"=").decode() + ".SiGnAtUrE"
        for _ in range(n)
    ]


def landed(port: int, cookie: str, header: str | None = None) -> str:
    """The node that answers a request carrying ``cookie`` (or the Cookie ``header``)."""
    for attempt in range(50):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            header = f"other=1; statescale={cookie}" if header is None else header
            conn.request("GET", "/", headers={"Cookie": header})
            body = conn.getresponse().read().decode()
            conn.close()
            return body
        except (ConnectionRefusedError, ConnectionResetError):
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError(f"nothing answered on port {port}")


@pytest.mark.parametrize("balancer", ["nginx", "haproxy"])
def test_1000_cookies_land_where_the_replica_predicts(
    balancer: str, backends: dict[str, Backend], tmp_path: Path
) -> None:
    memberships = {
        "four nodes": ["node1", "node2", "node3", "node4"],
        "one added": ["node1", "node2", "node3", "node4", "node5"],
        "one removed": ["node1", "node3", "node4", "node5"],
    }
    cookies = sample_cookies(1000, seed=7)
    for label, names in memberships.items():
        members = [backends[name] for name in names]
        port = free_port()
        process = start_balancer(balancer, members, port, tmp_path)
        try:
            ring = balancers.get(balancer).ring(members)
            wrong = [
                (c, got, want)
                for c in cookies
                if (got := landed(port, c)) != (want := ring.owner(c.partition(".")[0]))
            ]
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(10)
        assert wrong == [], f"{balancer}, {label}: {len(wrong)} of 1000 elsewhere, e.g. {wrong[:3]}"


@pytest.mark.parametrize("balancer", ["nginx", "haproxy"])
def test_the_balancers_route_by_the_cookie_value_statescale_reads(
    balancer: str, backends: dict[str, Backend], tmp_path: Path
) -> None:
    # nginx read $cookie_NAME: a name with '-' or '.' (the __Host- prefix) was never
    # found, and junk before the ID went round robin; HAProxy took the last value.
    from statescale.cookies import cookie_value

    members = list(backends.values())
    ring = balancers.get(balancer).ring(members)
    a, *others = sample_cookies(40, seed=3)
    b = next(
        c for c in others if ring.owner(c.partition(".")[0]) != ring.owner(a.partition(".")[0])
    )
    for name in ("__Host-sid", "session.id"):
        port = free_port()
        process = start_balancer(balancer, members, port, tmp_path, cookie=name)
        try:
            for header in (
                f"{name}={a}; {name}={b}",  # two of the name (two paths): the first
                f"{name}=junk; {name}={b}",  # junk first: the signed one
                f"{name.upper()}={a}; x{name}={a}; {name}={b}",  # other names
                f'other=1;{name} = "{a}" ;{name}={b}',  # spaces, quotes
                f"{name}={a},x=1; {name}={b}",  # Cookie lines a server joined: ends at ','
                f"x={b},{name}={b}; {name}={a}",  # a comma in another's value: no pair
            ):
                sid = cookie_value(header.encode(), name.encode())
                assert sid is not None
                want = ring.owner(sid.partition(".")[0])
                assert {landed(port, "", header) for _ in range(3)} == {want}, header
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(10)


@pytest.mark.parametrize("balancer", ["nginx", "haproxy"])
def test_several_cookie_lines_reach_the_owner_of_the_session_the_app_reads(
    balancer: str, backends: dict[str, Backend], tmp_path: Path
) -> None:
    # A client that sends several Cookie lines (none may, RFC 6265 5.4): the balancer
    # hands the app one line, the one it hashed, whichever line carries the session.
    from statescale.cookies import cookie_value

    members = list(backends.values())
    ring = balancers.get(balancer).ring(members)
    a, b = sample_cookies(2, seed=11)
    port = free_port()
    process = start_balancer(balancer, members, port, tmp_path)
    try:
        landed(port, a)  # it listens
        for lines, want in (
            (["other=1", f"statescale={a}"], a),  # only the second line has it
            ([f"statescale={a}", f"statescale={b}"], a),
            (["x=1", "y=2", "z=3", f"statescale={b}"], b),
            ([f"c{n}=1" for n in range(8)] + [f"statescale={a}"], a),  # none dropped
        ):
            for _ in range(3):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.putrequest("GET", "/")
                for line in lines:
                    conn.putheader("Cookie", line)
                conn.endheaders()
                reply = conn.getresponse()
                node, seen = reply.read().decode(), reply.getheader("X-Cookie") or ""
                conn.close()
                assert cookie_value(seen.encode(), b"statescale") == want, (lines, seen)
                assert node == ring.owner(want.partition(".")[0]), (lines, seen)
                assert seen.count("=") == len(lines)  # every cookie reached the app
        if balancer == "haproxy":  # more lines than it joins: refused, never cut short
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.putrequest("GET", "/")
            for n in range(17):
                conn.putheader("Cookie", f"c{n}=1")
            conn.endheaders()
            assert conn.getresponse().status == 400
            conn.close()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)
