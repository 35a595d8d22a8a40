"""The router's connection to a node, fed bytes by hand: when it lets the node go."""

from __future__ import annotations

import asyncio

from statescale.routing.router.http1 import END, Event, ResponseHead, ResponseParser
from statescale.routing.router.upstream import Upstream


class Transport:
    """What Upstream uses of an asyncio transport."""

    def __init__(self) -> None:
        self.closed = False
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def relayed(upstream: Upstream) -> list[Event]:
    """The events the relay would take from ``upstream`` now."""
    assert upstream.parser is not None
    events = list(upstream.parser.events)
    upstream.parser.events.clear()
    return events


def exchange(*pieces: bytes, head_only: bool = False) -> tuple[Upstream, Transport]:
    loop = asyncio.new_event_loop()
    try:
        upstream, transport = Upstream(loop), Transport()
        upstream.connection_made(transport)  # type: ignore[arg-type]
        upstream.begin(ResponseParser(head_only=head_only))
        for piece in pieces:
            upstream.data_received(piece)
        return upstream, transport
    finally:
        loop.close()


CLOSE = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n"


def test_a_response_after_which_the_node_closes_lets_the_node_go_once_whole() -> None:
    # gunicorn's sync worker waits for the router's close before its next request:
    # the router closes as soon as the response is all here, before relaying it.
    upstream, transport = exchange(CLOSE, b"o")
    assert not transport.closed  # one byte of the body still to come
    upstream.data_received(b"k")
    assert transport.closed
    events = relayed(upstream)
    assert isinstance(events[0], ResponseHead) and events[1:] == [b"o", b"k", END]
    assert not upstream.finish()  # and never pooled


def test_a_kept_alive_response_keeps_its_connection() -> None:
    upstream, transport = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert not transport.closed
    relayed(upstream)
    assert upstream.finish()


def test_an_interim_response_does_not_end_the_exchange() -> None:
    upstream, transport = exchange(b"HTTP/1.1 100 Continue\r\nConnection: close\r\n\r\n")
    assert not transport.closed  # the final response is still to come
    upstream.data_received(CLOSE + b"ok")
    assert transport.closed


def test_a_body_that_ends_when_the_node_closes_waits_for_that_close() -> None:
    _, transport = exchange(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nsome body")
    assert not transport.closed


def test_stray_bytes_after_a_response_keep_its_connection_from_the_pool() -> None:
    # Half a message after the response makes no event: the connection was pooled.
    stray = b"HTTP/1.1 200 OK\r\nX: 1\r\n"
    upstream, _ = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + stray)
    relayed(upstream)
    assert not upstream.finish()
