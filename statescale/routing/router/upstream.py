"""One connection from the router to a node, as an asyncio protocol: what the node sends
goes straight into the response's parser, and the request waits on one future only when
the parser has nothing for it. (Streams cost a reader, a writer and a future per read,
on the hottest path the router has.)

A connection is reused only after a response that ended cleanly: any error, a malformed
response, or a byte the node sends when no response is expected closes it for good.
"""

from __future__ import annotations

import asyncio
from typing import cast

from ..backends import Backend
from .http1 import END, ResponseParser

HIGH_WATER = 256  # parser events queued before the node is asked to pause
LOW_WATER = 64


class NodeFailed(Exception):
    """The node's response failed; ``closed``: it closed before sending anything (a
    pooled connection it had dropped: the request may go again on a new one)."""

    def __init__(self, why: str, *, closed: bool = False) -> None:
        super().__init__(why)
        self.closed = closed


class Upstream(asyncio.Protocol):
    """A connection to a node; ``begin`` a response, ``send`` the request, then take the
    response's events with ``next_event`` until ``END``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.backend: Backend | None = None  # whom it connects to (set by the router)
        self.transport: asyncio.Transport | None = None
        self.parser: ResponseParser | None = None
        self.closed = False
        self.idle_since = 0.0  # when it went back to the pool (the loop's clock)
        self.half_closed = False  # our side is shut: the node saw the request end there
        self.node_closes: bool | None = None  # what the last whole response said, if any
        self.failure: str | None = None
        self.timed_out = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    # -- the protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:  # nobody asked: the connection is not to be trusted again
            self._fail("the node sent bytes outside a response")
            return
        try:
            parser.feed(data)
        except ValueError as exc:
            self._fail(str(exc))
            return
        if len(parser.events) > HIGH_WATER and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()
        elif parser.complete and not parser.keep_alive and self.transport is not None:
            # The whole response is here and the node closes after it: close now, not
            # once it is relayed. (A node that waits for our close before it takes the
            # next request, as gunicorn's sync worker does, is free again at once.)
            self.transport.close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is not None and self.failure is None:
            self.failure = repr(exc)
        self._wake()

    def _fail(self, why: str) -> None:
        self.failure = why
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- one exchange ----------------------------------------------------------------
    @property
    def usable(self) -> bool:
        """Open, and never saw anything wrong."""
        return not self.closed and self.failure is None and self.parser is None

    def begin(self, parser: ResponseParser) -> None:
        self.parser = parser
        self.node_closes = None

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def send_eof(self) -> None:
        """Shut our side once the request is out (``send`` first): the connection
        carries this one exchange only."""
        assert self.transport is not None
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.half_closed = True

    def ready(self) -> bool:
        """Whether the response has an event waiting (no wait for the node)."""
        return self.parser is not None and bool(self.parser.events)

    def finish(self) -> bool:
        """The response is done: whether the connection may carry another (the node
        said keep-alive, the response ended cleanly, nothing beyond it arrived)."""
        parser, self.parser = self.parser, None
        if parser is not None and parser.complete and not parser.head_only:
            self.node_closes = not parser.keep_alive
        if parser is None or parser.events or parser.in_message or parser.until_close:
            return False  # (in_message: stray bytes past the response, not a whole one)
        if self._paused:
            return False
        return parser.keep_alive and self.usable and not self.half_closed

    async def next_event(self) -> object:
        """The response's next event; :class:`NodeFailed` when the node failed it (or
        the deadline aborted the wait: ``timed_out``)."""
        parser = self.parser
        assert parser is not None
        while not parser.events:
            if self.failure is not None:
                if self.timed_out:
                    raise NodeFailed("no answer in time")
                # a reset before any of the response: as good as closed (a dropped pool
                # connection), unless the node had the response half sent
                raise NodeFailed(self.failure, closed=self.closed and not parser.in_message)
            if self.closed:
                if parser.in_message and parser.until_close:
                    return END  # a body delimited by the node closing
                if self.timed_out:
                    raise NodeFailed("no answer in time")
                raise NodeFailed("closed the connection", closed=not parser.in_message)
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._paused and len(parser.events) < LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return parser.events.popleft()

    def abort(self) -> None:
        """The response did not come in time (the connection's deadline passed)."""
        self.timed_out = True
        self._fail("no answer in time")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
