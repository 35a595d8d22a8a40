"""Passing client connections to workers: the head peek, and a real connection passed
through a real channel to a slot's listener."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from statescale.routing.router.http1 import RequestHead, RequestParser
from statescale.routing.router.passing import (
    PEEK_BYTES,
    PassedSocket,
    Passer,
    RoutingListener,
    SlotListener,
    Turns,
    peek_head,
    send_connection,
    whole_request,
)

HEAD = (
    b"GET /api/session HTTP/1.1\r\nHost: x\r\nCookie: a=1\r\n"
    b"User-Agent: t\r\ncookie:  statescale=abc.def  \r\nCOOKIE: b=2\r\n\r\n"
)


def _parsed_cookie(head: bytes) -> bytes:
    parser = RequestParser()
    parser.feed(head)
    event = parser.events[0]
    assert isinstance(event, RequestHead)
    return event.cookie


@pytest.mark.parametrize(
    "head",
    [
        HEAD,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nCookie: s=1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Cookie: no=1\r\nCookie:s=2\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nCookie: \tq=1;r=2\t\r\n\r\nhi",
    ],
)
def test_the_peek_reads_the_cookies_the_parser_reads(head: bytes) -> None:
    # The two must agree, or a session's requests would go to two workers.
    assert whole_request(head) == _parsed_cookie(head)


@pytest.mark.parametrize(
    "data",
    [
        HEAD[:-2],  # the head still coming
        b"GET / HTTP/1.1\nHost: x\nCookie: s=1\n\n",  # bare LF
        b"GET / HTTP/1.1\r\nHost: x\r\nCookie: s=1\r\n  t=2\r\n\r\n",  # a folded line
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhi",  # the body coming
        HEAD + HEAD,  # pipelined
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nhi",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\nhi",
        b"GET / HTTP/1.1\r\nCookie: s=1\r\n\r\n",  # no Host: the proxy answers 400
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n",  # the proxy's to set
        b"GET / HTTP/1.1\r\nHost: x\r\nforwarded: for=6.6.6.6\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
        # Connection names a header: the proxy leaves it out, a worker would read it
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: cookie\r\nCookie: s=a.b\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
    ],
)
def test_only_one_whole_plain_request_is_passed(data: bytes) -> None:
    # Anything else is the proxy's: it buffers what is still coming, and its parser
    # judges framing, so a worker never waits on a client nor sees what it refuses.
    assert whole_request(data) is None


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


@pytest.fixture
def slot(tmp_path: object) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(f"{tmp_path}/slot.sock")
    sock.listen(8)
    yield sock
    sock.close()


@pytest.fixture
def channel() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A slot's channel as the master makes it: the router's end, the workers' end."""
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield sender, receiver
    sender.close()
    receiver.close()


PUBLIC = ("127.0.0.1", 8000)  # what the slot listener says gunicorn listens on


def _client(listener: socket.socket, data: bytes) -> socket.socket:
    """A client of ``listener`` that has sent ``data``."""
    client = socket.create_connection(listener.getsockname())
    if data:
        client.sendall(data)
    return client


def _accepted(listener: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
    listener.setblocking(True)
    conn, peer = listener.accept()
    listener.setblocking(False)
    return conn, peer


def test_a_connection_is_passed_whole_to_the_owner_with_its_clients_address(
    listener: socket.socket, slot: socket.socket, channel: tuple[socket.socket, socket.socket]
) -> None:
    sender, receiver = channel
    chosen: list[tuple[bytes, str]] = []
    proxied: list[socket.socket] = []

    def choose(cookie: bytes, ip: str) -> str:
        chosen.append((cookie, ip))
        return "worker1"

    passer = Passer(choose, {"worker1": sender}, proxied.append)
    worker = SlotListener(receiver, slot, PUBLIC)
    worker.setblocking(False)
    with pytest.raises(BlockingIOError):
        worker.accept()  # nothing passed yet, nothing queued at the slot
    client = _client(listener, HEAD)
    conn, peer = _accepted(listener)
    passer.place(conn, peer)
    assert (passer.passed, proxied) == (1, [])
    assert chosen == [(_parsed_cookie(HEAD), "127.0.0.1")]
    assert conn.fileno() == -1  # the router's copy is closed

    served, address = worker.accept()
    assert address == client.getsockname()  # the client's own address, not a proxy's
    assert worker.getsockname() == PUBLIC
    served.settimeout(5)
    assert served.recv(65536) == HEAD  # the peek consumed nothing
    served.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    # gunicorn's close_graceful: shut, then read until the client closes. The client
    # has not closed, yet the read ends at once: nothing of the request was left.
    served.setblocking(True)  # as gunicorn's sync worker has it
    served.shutdown(socket.SHUT_WR)
    served.settimeout(2.0)  # as close_graceful then does
    assert served.recv(4096) == b""
    served.close()
    client.settimeout(5)
    assert client.recv(100).startswith(b"HTTP/1.1 204")
    client.close()
    worker.close()


def test_bytes_after_the_request_make_the_close_linger(
    listener: socket.socket, slot: socket.socket, channel: tuple[socket.socket, socket.socket]
) -> None:
    # A client that sent more after its request (pipelining): closing with those
    # unread would reset the connection and could cut the answer short, so the worker
    # reads them as gunicorn would.
    sender, receiver = channel
    passer = Passer(lambda cookie, ip: "worker1", {"worker1": sender}, lambda conn: None)
    worker = SlotListener(receiver, slot, PUBLIC)
    client = _client(listener, HEAD)
    passer.place(*_accepted(listener))
    served, _ = worker.accept()
    served.setblocking(True)
    assert served.recv(65536) == HEAD
    client.sendall(b"late")
    time.sleep(0.2)  # arrived
    served.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    served.shutdown(socket.SHUT_WR)
    served.settimeout(5)
    client.settimeout(5)
    assert client.recv(100).startswith(b"HTTP/1.1 204")
    client.sendall(b"more")
    assert served.recv(4096) == b"more"  # read, not cut off: the close lingers
    client.close()
    assert served.recv(4096) == b""  # until the client's own close
    served.close()
    worker.close()


def test_what_cannot_be_routed_by_a_peek_is_proxied(
    listener: socket.socket, channel: tuple[socket.socket, socket.socket]
) -> None:
    sender, receiver = channel
    proxied: list[socket.socket] = []
    passer = Passer(lambda cookie, ip: "worker1", {"worker1": sender}, proxied.append)
    clients = []
    for first in (HEAD[:20], b""):  # half a head; nothing yet
        clients.append(_client(listener, first))
        passer.place(*_accepted(listener))
    receiver.close()  # a channel nobody reads any more: sending fails
    clients.append(_client(listener, HEAD))
    conn, peer = _accepted(listener)
    assert not send_connection(sender, conn, peer)
    passer.place(conn, peer)
    assert (passer.passed, passer.proxied, len(proxied)) == (0, 3, 3)
    for conn in proxied:  # still open, for the proxy to serve
        assert conn.fileno() != -1
        conn.close()
    for client in clients:
        client.close()


def test_the_slot_listener_takes_proxied_connections_too(
    slot: socket.socket, channel: tuple[socket.socket, socket.socket]
) -> None:
    worker = SlotListener(channel[1], slot, PUBLIC)
    worker.setblocking(False)
    proxy = socket.socket(socket.AF_UNIX)
    proxy.connect(slot.getsockname())
    conn, _ = worker.accept()
    proxy.sendall(b"x")
    conn.settimeout(5)
    assert conn.recv(1) == b"x"
    for sock in (conn, proxy):
        sock.close()
    worker.close()


def test_a_connection_that_cannot_be_placed_is_closed_and_the_next_is_served(
    listener: socket.socket,
    channel: tuple[socket.socket, socket.socket],
    caplog: pytest.LogCaptureFixture,
) -> None:
    chosen: list[bytes] = []

    def choose(cookie: bytes, ip: str) -> str:
        chosen.append(cookie)
        if len(chosen) == 1:
            raise RuntimeError("a bug")
        return "worker1"

    passer = Passer(choose, {"worker1": channel[0]}, lambda conn: None)
    passer._listen = listener  # as start() leaves it, without a loop
    clients = [_client(listener, HEAD) for _ in range(2)]
    time.sleep(0.2)
    passer._accept()
    assert len(chosen) == 2 and passer.passed == 1
    assert "placing a connection" in caplog.text
    clients[0].settimeout(5)
    try:  # closed, not left hanging (reset: its request was never read)
        answer = clients[0].recv(10)
    except ConnectionResetError:
        answer = b""
    assert answer == b""
    for client in clients:
        client.close()


# -- workers that route among themselves (STATESCALE_ROUTING=workers) --------------------

WHOLE = [
    HEAD,
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nCookie: \tq=1;r=2\t\r\n\r\nhi",
    b"POST / HTTP/1.1\r\nHost: x\r\ncontent-length:0\r\n\r\n",
]


@pytest.mark.parametrize("head", WHOLE)
def test_a_workers_peek_reads_the_cookies_the_parser_reads(head: bytes) -> None:
    assert peek_head(head) == (_parsed_cookie(head), True)


@pytest.mark.parametrize(
    "data",
    [
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhi",  # the body coming
        HEAD + HEAD,  # pipelined
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nhi",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\nhi",
    ],
)
def test_a_workers_peek_tells_a_request_not_whole(data: bytes) -> None:
    # Routed all the same (by its head), but not passed: its close must linger.
    head = peek_head(data)
    assert head is not None and head[1] is False


def test_a_head_longer_than_the_peek_is_read_to_its_last_whole_line() -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\nCookie: statescale=b.sig\r\nX-Pad: "
    assert peek_head((head + b"p" * PEEK_BYTES)[:PEEK_BYTES]) == (b"statescale=b.sig", False)


def test_a_head_still_coming_is_not_read_at_all() -> None:
    assert peek_head(HEAD[:-2]) is None
    assert peek_head(b"") is None


@pytest.fixture
def two_workers(
    listener: socket.socket,
) -> Iterator[tuple[RoutingListener, RoutingListener, list[bool]]]:
    """Workers a and b routing among themselves on ``listener``: a session cookie
    ``statescale=<slot>.sig`` belongs to that slot. The list: whether a still runs."""
    a_out, a_in = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b_out, b_in = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    running = [True]

    def owner(header: bytes) -> str | None:
        value = header.partition(b"statescale=")[2].partition(b".")[0]
        return value.decode() or None

    turns = Turns()
    a = RoutingListener(
        a_in, listener, "a", {"b": b_out}, owner=owner, running=lambda: running[0], turns=turns
    )
    b = RoutingListener(b_in, listener, "b", {"a": a_out}, owner=owner, turns=turns)
    for worker in (a, b):
        worker.setblocking(False)  # as gunicorn's sync worker has its listeners
    yield a, b, running
    for sock in (a, b, a_out, b_out):
        sock.close()


def _request(cookie: str = "") -> bytes:
    header = f"Cookie: statescale={cookie}\r\n" if cookie else ""
    return f"GET /api/session HTTP/1.1\r\nHost: x\r\n{header}\r\n".encode()


def _arrived(listener: socket.socket) -> None:
    """Wait until a connection is queued at ``listener`` with its request."""
    select.select([listener], [], [], 5)
    time.sleep(0.05)


def _passed_on(
    listener: socket.socket, by: RoutingListener, to: RoutingListener
) -> tuple[socket.socket, Any]:
    """Once a connection has arrived: ``by`` accepts it and keeps nothing (it passed it
    on); what ``to`` takes from its channel: the connection and its client's address."""
    _arrived(listener)
    with pytest.raises(BlockingIOError):
        by.accept()
    return to.take_passed()


def test_a_worker_passes_a_session_it_does_not_own_to_its_owner(
    listener: socket.socket, two_workers: tuple[RoutingListener, RoutingListener, list[bool]]
) -> None:
    a, b, _ = two_workers
    client = _client(listener, _request("b.sig"))
    served, address = _passed_on(listener, a, b)
    assert a.passed == 1
    assert address == client.getsockname()
    served.settimeout(5)
    assert served.recv(65536) == _request("b.sig")
    served.close()
    client.close()

    own = _client(listener, _request("a.sig"))
    _arrived(listener)
    conn, _ = a.accept()  # its own: served here, closed at once when answered
    assert isinstance(conn, PassedSocket)
    conn.close()
    own.close()


def test_requests_without_a_session_take_turns(
    listener: socket.socket, two_workers: tuple[RoutingListener, RoutingListener, list[bool]]
) -> None:
    a, b, _ = two_workers
    clients = [_client(listener, _request()) for _ in range(4)]
    _arrived(listener)
    served_here = []
    with pytest.raises(BlockingIOError):
        while True:
            served_here.append(a.accept()[0])
    assert (len(served_here), a.passed) == (2, 2)  # every other one went to b
    for conn in [*served_here, b.take_passed()[0], b.take_passed()[0], *clients]:
        conn.close()


def test_the_workers_turns_are_one_count_across_processes() -> None:
    # Each worker counting alone, sequential new sessions landed 1/7/8/16 of 32.
    turns = Turns()
    child = os.fork()
    if child == 0:  # another worker takes three turns
        os._exit(0 if [turns.next(4) for _ in range(3)] == [0, 1, 2] else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [turns.next(4) for _ in range(3)] == [3, 0, 1]


def test_a_head_still_arriving_is_waited_for_and_passed_to_the_owner(
    listener: socket.socket, two_workers: tuple[RoutingListener, RoutingListener, list[bool]]
) -> None:
    # A sticky session lives in its owner's memory alone: served elsewhere it would
    # start afresh. So the request goes to the owner even when it comes in pieces.
    a, b, _ = two_workers
    request = _request("b.sig")
    client = _client(listener, request[:20])
    threading.Timer(0.2, client.sendall, [request[20:]]).start()
    served, _ = _passed_on(listener, a, b)
    assert isinstance(served, PassedSocket)
    for sock in (served, client):
        sock.close()


def test_a_request_whose_body_is_still_coming_is_passed_and_lingers(
    listener: socket.socket, two_workers: tuple[RoutingListener, RoutingListener, list[bool]]
) -> None:
    a, b, _ = two_workers
    head = b"POST /api/set HTTP/1.1\r\nHost: x\r\nCookie: statescale=b.sig\r\n"
    client = _client(listener, head + b"Content-Length: 5\r\n\r\nhi")
    served, _ = _passed_on(listener, a, b)
    assert type(served) is socket.socket  # not a PassedSocket: its close lingers
    client.sendall(b"!!!")
    served.settimeout(5)
    received = b""
    while not received.endswith(b"hi!!!"):
        received += served.recv(65536)
    for sock in (served, client):
        sock.close()


def test_what_cannot_reach_its_owner_is_served_where_it_landed(
    listener: socket.socket, two_workers: tuple[RoutingListener, RoutingListener, list[bool]]
) -> None:
    # A client that never finishes its head, and a request for a worker whose channel
    # is broken: served here (gunicorn judges the first; a log line tells of the other).
    a, b, _ = two_workers
    a.HEAD_WAIT = 0.2
    half = _client(listener, _request("b.sig")[:20])
    _arrived(listener)
    conn, _ = a.accept()
    assert type(conn) is socket.socket
    conn.close()
    b.channel.close()  # b's end: nobody reads b's channel any more
    whole = _client(listener, _request("b.sig"))
    _arrived(listener)
    conn, _ = a.accept()
    assert isinstance(conn, PassedSocket) and a.passed == 0
    for sock in (conn, half, whole):
        sock.close()


def test_a_stopping_worker_accepts_nothing_more(
    listener: socket.socket, two_workers: tuple[RoutingListener, RoutingListener, list[bool]]
) -> None:
    a, b, running = two_workers
    running[0] = False
    client = _client(listener, _request("b.sig"))
    _arrived(listener)
    with pytest.raises(BlockingIOError):
        a.accept()
    conn, _ = b.accept()  # still queued at the listener, for a worker that runs
    for sock in (conn, client):
        sock.close()


def test_a_head_past_the_first_peek_is_still_routed_by_its_cookie(
    listener: socket.socket, two_workers: tuple[RoutingListener, RoutingListener, list[bool]]
) -> None:
    # An independent review: browsers send heads past 8 KB (a long Referer, many
    # cookies); the Cookie line cut off by the peek sent the request to any worker.
    a, b, _ = two_workers
    head = b"GET /api/session HTTP/1.1\r\nHost: x\r\nReferer: https://x/" + b"r" * 8200
    head += b"\r\nCookie: statescale=b.sig\r\n\r\n"
    client = _client(listener, head)
    served, _ = _passed_on(listener, a, b)
    served.settimeout(5)
    received = b""
    while len(received) < len(head):
        received += served.recv(65536)
    assert received == head
    served.close()
    client.close()


def test_one_accept_passes_for_a_bounded_time(
    listener: socket.socket, two_workers: tuple[RoutingListener, RoutingListener, list[bool]]
) -> None:
    # Heads that each came just before HEAD_WAIT kept one accept() passing for 16 x 2 s
    # (30.4 s, measured): past gunicorn's --timeout, which killed the worker, and with it
    # a sticky worker's sessions. Now no connection is begun past BATCH_TIME.
    a, _, _ = two_workers
    a.HEAD_WAIT, a.BATCH_TIME = 0.5, 0.3
    request = _request("b.sig")
    clients = [_client(listener, request[:20]) for _ in range(a.BATCH)]
    started = time.monotonic()

    done = threading.Event()

    def finish() -> None:
        for n, client in enumerate(clients, start=1):
            if done.wait(max(0.0, started + 0.2 * n - time.monotonic())):
                return
            client.sendall(request[20:])

    finisher = threading.Thread(target=finish, daemon=True)
    finisher.start()
    _arrived(listener)
    with pytest.raises(BlockingIOError):
        a.accept()
    took = time.monotonic() - started
    assert took < 0.3 + 0.5 + 0.2, took  # the budget, and the last head begun within it
    assert 1 <= a.passed < len(clients)
    done.set()
    finisher.join(5)
    for client in clients:
        client.close()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GET / HTTP/1.1\nHost: x\n\n", id="bare-LF"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nCookie: statescale=b.sig\n\r\n", id="mixed"),
    ],
)
def test_a_head_that_can_never_end_is_not_waited_for(
    listener: socket.socket,
    two_workers: tuple[RoutingListener, RoutingListener, list[bool]],
    data: bytes,
) -> None:
    # A bare LF never ends a head that the peek reads, so the worker waited out
    # HEAD_WAIT (2 s, serving nothing) for every such packet, after its client had gone
    # too; gunicorn refuses it at once.
    a, _, _ = two_workers
    client = _client(listener, data)
    client.close()
    _arrived(listener)
    started = time.monotonic()
    conn, _ = a.accept()  # here: gunicorn's parser answers it (a 400)
    assert time.monotonic() - started < 0.5
    conn.close()


def test_a_client_that_has_sent_all_it_will_is_not_waited_for(
    listener: socket.socket, two_workers: tuple[RoutingListener, RoutingListener, list[bool]]
) -> None:
    a, _, _ = two_workers
    client = _client(listener, _request("b.sig")[:20])
    client.shutdown(socket.SHUT_WR)  # a head cut short, and no more to come
    _arrived(listener)
    started = time.monotonic()
    conn, _ = a.accept()
    assert time.monotonic() - started < 0.5
    for sock in (conn, client):
        sock.close()


def test_a_pass_that_fails_says_why(
    listener: socket.socket,
    two_workers: tuple[RoutingListener, RoutingListener, list[bool]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every failure was logged as "channel stayed full for 1s": the kernel's refusals
    # too (ETOOMANYREFS past the open-files limit, EPIPE), which never waited.
    a, b, _ = two_workers
    b.channel.close()  # nobody reads b's channel
    client = _client(listener, _request("b.sig"))
    _arrived(listener)
    conn, _ = a.accept()
    assert a.passed == 0
    assert "served here: passing failed (EPIPE" in caplog.text, caplog.text
    for sock in (conn, client):
        sock.close()
