"""Passing a client's connection to the worker that serves it (Unix descriptor passing).

Under one gunicorn master (sticky and affinity modes) the router need not stand in the
middle of every exchange: gunicorn's sync worker answers one request a connection and
closes it. So the router accepts a connection, *peeks* at its request (``MSG_PEEK``:
the bytes stay in the socket, for the worker to read), picks the slot
exactly as it would for proxying (:meth:`.Router.choose`), and sends the descriptor to
that slot's *channel*: one end of a Unix stream socket pair that the master keeps open,
one a slot (``SCM_RIGHTS``, with a small record of the client's address). The worker
takes connections from its channel as from a listener (:class:`SlotListener`) and
serves the client's own socket: no second connection, no relay, and the worker sees the
client's address.

Only a request that has arrived whole is passed, so a worker never waits on a client
for any of it, as behind a buffering proxy, and a passed connection closes as soon as
its answer is written (:class:`PassedSocket`): a client that sends slowly or never
closes holds the router's connection, never a worker. Every other connection is proxied
as before, to the slot's socket: a request not whole when accepted (the listener
defers accepting until data comes, ``TCP_DEFER_ACCEPT``, so that is rare for a request
without a body), larger than ``PEEK_BYTES``, pipelined behind another, chunked, or
unusual (bare LF line ends, folded lines: the proxy's parser judges those), and any
connection whose slot's channel is full.

A passed connection is the worker's alone. A worker killed while it holds one closes it
(its request fails, as one in flight behind a proxy does); one queued in a channel
waits there for the slot's next worker, as a connection queued at the slot's socket does.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import logging
import os
import re
import select
import socket
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger("statescale.router")

#: Bytes of a request head the router looks at; a longer head is proxied.
PEEK_BYTES = 8192
#: Connections accepted in one go before the loop serves anything else.
ACCEPT_BATCH = 64
#: Seconds the listener rests after accept() failed for want of descriptors.
ACCEPT_PAUSE = 1.0

# What each passed descriptor rides on: the client's address family, port and address
# (the router has them from accept(); the worker need not ask the kernel again).
_RECORD = struct.Struct("=HH16s")
_FD_SPACE = socket.CMSG_SPACE(array.array("i", [0]).itemsize)
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT
# A Cookie header line (names are case-insensitive): its value without the spaces before
# it, as the router's parser (llhttp) reads it. The line end after it is looked at, not
# taken, so that the next line's match can start there.
_COOKIE = re.compile(rb"\r\ncookie:[ \t]*([^\r\n]*)(?=\r\n)", re.IGNORECASE)


# A framing header line: Content-Length or Transfer-Encoding, and its value.
_FRAMING = re.compile(rb"\r\n(content-length|transfer-encoding):[ \t]*([^\r\n]*)", re.IGNORECASE)


def whole_request(data: bytes) -> bytes | None:
    """The Cookie headers (joined with "; ", as the router's parser joins them) of the
    one whole request that ``data`` is; ``None`` when it is less (a head or a body still
    on its way), more (a pipelined request behind it), or one for the parser to judge
    (bare LF line ends, folded lines, a chunked or ambiguous body). A passed worker
    then never waits on its client for any part of the request."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = data[: end + 2]
    if head.count(b"\n") != head.count(b"\r\n") or b"\n " in head or b"\n\t" in head:
        return None
    length = 0
    framing = _FRAMING.findall(head)
    if framing:
        values = {value.strip() for name, value in framing}
        if len(values) != 1 or any(name.lower() != b"content-length" for name, _ in framing):
            return None
        (value,) = values
        if not value.isdigit():
            return None
        length = int(value)
    if len(data) != end + 4 + length:
        return None
    return b"; ".join(_COOKIE.findall(head))


def send_connection(channel: socket.socket, conn: socket.socket, peer: Any) -> bool:
    """Pass ``conn``, whose client is at ``peer``, through ``channel`` without waiting;
    False when the channel is full or broken (``conn`` is then still the caller's)."""
    try:
        record = _RECORD.pack(conn.family, peer[1], socket.inet_pton(conn.family, peer[0]))
        fds = array.array("i", [conn.fileno()])
        channel.sendmsg([record], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], _SEND_FLAGS)
    except (OSError, ValueError, IndexError, TypeError):
        return False
    return True


class PassedSocket(socket.socket):
    """A passed client connection. The router saw the whole request arrive, so once the
    worker has answered and shut its side, nothing is left to read: gunicorn's
    ``close_graceful``, which would wait up to 2 s for the client's own close (draining
    what it might still send), finds the end at once, and a client that never closes
    cannot hold the worker."""

    _answered = False

    def shutdown(self, how: int) -> None:
        super().shutdown(how)
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self._answered = True

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self._answered:
            return b""
        return super().recv(bufsize, flags)


class SlotListener:
    """What gunicorn's sync worker takes for its listener in a slot whose router passes
    connections: the slot's channel, and the slot's socket for the connections the
    router proxies. :meth:`accept` takes the next connection from either (the channel
    first, the socket first every ``FAIRNESS``-th time, so neither waits on the other
    for long), and raises ``BlockingIOError`` when neither has one. :meth:`fileno` is an
    epoll descriptor that is readable when either is, for the worker's ``select``.
    ``address`` is what :meth:`getsockname` answers: the public listener's."""

    FAIRNESS = 8

    def __init__(self, channel: socket.socket, slot: Any, address: Any) -> None:
        self.channel = channel
        self.slot = slot  # gunicorn's UnixSocket
        self.address = address
        self._epoll = select.epoll()  # this process's own: make it after the fork
        self._epoll.register(channel.fileno(), select.EPOLLIN)
        self._epoll.register(slot.fileno(), select.EPOLLIN)
        self._turn = 0

    def fileno(self) -> int:
        return self._epoll.fileno()

    def setblocking(self, flag: bool) -> None:
        self.channel.setblocking(flag)
        self.slot.setblocking(flag)

    def getsockname(self) -> Any:
        return self.address

    def accept(self) -> tuple[socket.socket, Any]:
        self._turn += 1
        if self._turn % self.FAIRNESS:
            try:
                return self._passed()
            except BlockingIOError:
                return self.slot.accept()  # type: ignore[no-any-return]
        try:
            return self.slot.accept()  # type: ignore[no-any-return]
        except BlockingIOError:
            return self._passed()

    def _passed(self) -> tuple[socket.socket, Any]:
        """The next connection in the channel, with its client's address."""
        record, ancillary, _, _ = self.channel.recvmsg(_RECORD.size, _FD_SPACE)
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        if not fds or len(record) != _RECORD.size:  # dropped: out of descriptors here
            for fd in fds:
                os.close(fd)
            raise BlockingIOError(errno.EAGAIN, "a passed connection came without its socket")
        family, port, packed = _RECORD.unpack(record)
        # Family and type given: the socket is made without asking the kernel.
        client = PassedSocket(family, socket.SOCK_STREAM, 0, fileno=fds[0])
        for extra in fds[1:]:  # never sent, never leaked either
            os.close(extra)
        size = 4 if family == socket.AF_INET else 16
        return client, (socket.inet_ntop(family, packed[:size]), port)

    def close(self) -> None:
        self._epoll.close()
        self.channel.close()
        self.slot.close()

    def __repr__(self) -> str:
        return f"<slot listener: passed connections on fd {self.channel.fileno()}, {self.slot}>"


class Passer:
    """The router's side: accepts on ``listen`` itself, passes each connection whose
    head it can route to the slot's channel, and hands every other one to ``proxy``
    (the router's ordinary client path)."""

    def __init__(
        self,
        choose: Callable[[bytes, str], str | None],
        channels: dict[str, socket.socket],
        proxy: Callable[[socket.socket], None],
    ) -> None:
        self.choose = choose
        self.channels = channels
        self.proxy = proxy
        self.passed = 0
        self.proxied = 0
        self._listen: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop, listen: socket.socket) -> None:
        listen.setblocking(False)
        # Accept once the request has come, as nginx's "deferred" does. (Not TCP, or not
        # Linux: connections come earlier, and more of them are proxied.)
        with contextlib.suppress(OSError, AttributeError):
            listen.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        self._listen, self._loop = listen, loop
        loop.add_reader(listen.fileno(), self._accept)

    def stop(self) -> None:
        """Stop accepting (the listener stays open: it is gunicorn's)."""
        if self._listen is not None and self._loop is not None:
            self._loop.remove_reader(self._listen.fileno())
        self._listen = None

    def _accept(self) -> None:
        listen = self._listen
        if listen is None:
            return
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = listen.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # out of descriptors, say: rest, then go on
                log.error("statescale router: accept failed (%s); pausing %gs", exc, ACCEPT_PAUSE)
                assert self._loop is not None
                self._loop.remove_reader(listen.fileno())
                self._loop.call_later(ACCEPT_PAUSE, self._resume, listen)
                return
            self.place(conn, peer)

    def _resume(self, listen: socket.socket) -> None:
        if self._listen is listen and self._loop is not None:
            self._loop.add_reader(listen.fileno(), self._accept)

    def place(self, conn: socket.socket, peer: Any) -> None:
        """Pass ``conn``, from ``peer``, to its slot, or proxy it."""
        try:
            data = conn.recv(PEEK_BYTES, _PEEK_FLAGS)
        except (BlockingIOError, InterruptedError):
            data = b""
        except OSError:  # reset before it said anything
            conn.close()
            return
        cookie = whole_request(data) if data else None
        if cookie is not None:
            channel = self.channels.get(self.choose(cookie, peer[0]) or "")
            if channel is not None and send_connection(channel, conn, peer):
                conn.close()  # the worker's now
                self.passed += 1
                return
        self.proxied += 1
        self.proxy(conn)
