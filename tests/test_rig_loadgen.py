"""The benchmark rig's load generators, on a small HTTP/1.1 server in this process."""

from __future__ import annotations

import shutil
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from benchmarks.rig import loadgen


class _QuietServer(ThreadingHTTPServer):
    """A load run ends by dropping its connections: a reset is no error here."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the router and nginx offer
    seen: list[tuple[str, str, str]] = []  # noqa: RUF012 - one server per test

    def _answer(self) -> None:
        self.seen.append((self.command, self.path, self.headers.get("Cookie", "")))
        if self.path == "/broken":
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.command == "POST":  # chunked, then closed, as some servers answer
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"2\r\nok\r\n0\r\n\r\n")
            self.close_connection = True
            return
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    Handler.seen = []
    httpd = _QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def test_python_generator_sends_the_mix_with_the_cookies(
    server: int,
) -> None:
    assert loadgen.generator("python") == "python"
    load = loadgen.run_load(
        server, ["a", "b"], writes=0.5, duration=0.5, connections=4, tool="python"
    )
    assert load.rps > 0
    assert 0 < load.p50_ms <= load.p90_ms <= load.p99_ms
    assert 0 < load.client_cores <= 1.5  # its own CPU: one thread's, a share of the run
    assert load.requests == len(Handler.seen)  # the count, not rate x duration
    methods = {m for m, _, _ in Handler.seen}
    paths = {p for _, p, _ in Handler.seen}
    assert methods == {"GET", "POST"}
    assert paths == {loadgen.READ[1], loadgen.WRITE[1]}
    assert {c for _, _, c in Handler.seen} == {"statescale=a", "statescale=b"}


def test_python_generator_on_one_route(server: int) -> None:
    loadgen.run_load(
        server, ["a"], writes=0.0, duration=0.2, route=("GET", "/health"), tool="python"
    )
    assert {(m, p) for m, p, _ in Handler.seen} == {("GET", "/health")}


@pytest.mark.parametrize("tool", ["python", "wrk"])
def test_a_failed_request_is_an_error_not_a_figure(server: int, tool: str) -> None:
    if tool == "wrk" and shutil.which("wrk") is None:
        pytest.fail("wrk is not installed: the README's test command installs it")
    with pytest.raises(RuntimeError, match="failed requests"):
        loadgen.run_load(
            server, ["a"], writes=0.0, duration=0.3, route=("GET", "/broken"), tool=tool
        )


def test_wrk_reads_rate_and_percentiles(server: int) -> None:
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed: the README's test command installs it")
    load = loadgen.run_load(server, ["a", "b"], writes=0.5, duration=0.5, connections=2, tool="wrk")
    assert load.rps > 0
    assert 0 < load.p50_ms <= load.p90_ms <= load.p99_ms
    assert load.client_cores > 0  # wrk's own CPU, which the servers did not get
    assert 0 < load.requests <= len(Handler.seen)  # (what was cut off at the end: not)
    assert {m for m, _, _ in Handler.seen} == {"GET", "POST"}
