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

With ``STATESCALE_ROUTING=workers`` the sync workers do the router's part themselves
(:class:`RoutingListener`): each accepts on gunicorn's listener, as plain gunicorn's do,
and passes what another slot owns through that slot's channel. No process stands in
between, and a worker's own sessions' connections are not passed at all. The peek is
read by :func:`peek_head`, a few regular expressions rather than the proxy's parser:
nothing is proxied, so only the choice of worker rides on it, and gunicorn's own parser
reads every request.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import logging
import mmap
import os
import re
import select
import socket
import struct
import termios
import time
from collections.abc import Callable
from typing import Any

from .http1 import END, MAX_HEAD, BadRequest, RequestHead, RequestParser

log = logging.getLogger("statescale.router")

#: Bytes of a request head the router looks at; a longer head is proxied.
PEEK_BYTES = 8192
#: A worker routing by itself looks again, this far, at a head longer than PEEK_BYTES:
#: browsers send heads past 8 KB (long referrers, many cookies), and a Cookie line cut
#: off would send the request to the wrong worker.
LONG_PEEK_BYTES = MAX_HEAD
#: Connections accepted in one go before the loop serves anything else.
ACCEPT_BATCH = 64
#: Seconds the listener rests after accept() failed for want of descriptors.
ACCEPT_PAUSE = 1.0
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# What each passed descriptor rides on: the client's address family, port and address
# (the router has them from accept(); the worker need not ask the kernel again).
_RECORD = struct.Struct("=HH16s")
#: Set in a record's family field: the request had not arrived whole when it was passed
#: (a worker routing by itself passes those too), so the close must linger as gunicorn's.
_PARTIAL = 0x8000
_FD_SPACE = socket.CMSG_SPACE(array.array("i", [0]).itemsize)
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT
# Headers the proxy replaces with its own (the client's address and scheme): a request
# that carries one is proxied, so that no app ever trusts one a client wrote.
_FORWARDING = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"forwarded"})


def whole_request(data: bytes) -> bytes | None:
    """The Cookie headers (joined as the router's parser joins them) of the one whole
    request that ``data`` is, read by the router's own parser, so a passed request goes
    where the proxy would send it, and only one the proxy would send on; ``None`` when
    ``data`` is less (a head or a body still on its way), more (a pipelined request
    behind it), a request the parser refuses, one with a body in chunks, or one that
    carries forwarding headers. A passed worker then never waits on its client."""
    parser = RequestParser()
    try:
        parser.feed(data)
    except BadRequest:
        return None
    events = parser.events
    # One message, ended, and nothing begun behind it (not pipelined, not cut short).
    if parser.in_message or events.count(END) != 1 or events[-1] is not END:
        return None
    head = events[0]
    if not isinstance(head, RequestHead) or (head.has_body and head.length < 0):  # chunked
        return None
    if head.hop_named or any(name.lower() in _FORWARDING for name, _ in head.headers):
        return None  # (passed as it came, a worker would read what the router did not)
    return head.cookie


def unread(channel: socket.socket) -> int:
    """Bytes sent through ``channel`` that its reader has not taken yet (``SIOCOUTQ``):
    0 once every passed connection has reached a worker."""
    try:
        raw = fcntl.ioctl(channel.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0  # closed: nothing more will be taken
    return int(struct.unpack("i", raw)[0])


def send_connection(
    channel: socket.socket, conn: socket.socket, peer: Any, *, whole: bool = True, wait: float = 0
) -> bool:
    """Pass ``conn``, whose client is at ``peer``, through ``channel``, waiting up to
    ``wait`` seconds for room; False when the channel is full or broken (``conn`` is
    then still the caller's). ``whole``: the request has arrived whole."""
    return passing_failure(channel, conn, peer, whole=whole, wait=wait) is None


def passing_failure(
    channel: socket.socket, conn: socket.socket, peer: Any, *, whole: bool = True, wait: float = 0
) -> str | None:
    """:func:`send_connection`, saying why a pass failed: ``None`` once passed, else
    what went wrong (the channel full for ``wait`` seconds, or the kernel's refusal:
    ``ETOOMANYREFS`` when the user's descriptors in flight reach its open-files limit,
    ``EPIPE`` when nobody reads the channel)."""
    try:
        family = conn.family | (0 if whole else _PARTIAL)
        record = _RECORD.pack(family, peer[1], socket.inet_pton(conn.family, peer[0]))
        fds = array.array("i", [conn.fileno()])
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
        try:
            sent = channel.sendmsg([record], ancillary, _SEND_FLAGS)
        except BlockingIOError:
            if wait <= 0 or not select.select([], [channel], [], wait)[1]:
                return f"its channel stayed full for {wait:g} s"
            sent = channel.sendmsg([record], ancillary, _SEND_FLAGS)
    except OSError as exc:
        return f"passing failed ({errno.errorcode.get(exc.errno or 0, exc.errno)}: {exc.strerror})"
    except (ValueError, IndexError, TypeError) as exc:
        return f"passing failed ({type(exc).__name__}: {exc})"
    if sent != _RECORD.size:  # never seen: a Unix stream socket sends 20 bytes whole
        raise RuntimeError(f"a channel took {sent} of {_RECORD.size} bytes; it is out of step")
    return None


class PassedSocket(socket.socket):
    """A passed client connection. The router saw the whole request arrive, so when the
    worker has answered and shuts its side, there is usually nothing left to read, and
    gunicorn's ``close_graceful`` (which reads until the client closes, up to 2 s, so
    that unread bytes cannot turn the close into a reset) is told so at once: a client
    that never closes cannot hold the worker. If bytes did come after the request (a
    pipelined one), the close lingers as gunicorn's does."""

    _answered = False

    def shutdown(self, how: int) -> None:
        super().shutdown(how)
        if how not in (socket.SHUT_WR, socket.SHUT_RDWR) or self.gettimeout() is not None:
            return
        try:  # blocking mode (gunicorn's): one look, no wait
            late = super().recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            self._answered = True
        except OSError:
            self._answered = True  # reset or gone: nothing to linger for
        else:
            self._answered = not late  # b"": the client has closed already

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
                return self.take_passed()
            except BlockingIOError:
                return self._accepted()
        try:
            return self._accepted()
        except BlockingIOError:
            return self.take_passed()

    def _accepted(self) -> tuple[socket.socket, Any]:
        """The next connection on the socket (``BlockingIOError``: none waiting)."""
        return self.slot.accept()  # type: ignore[no-any-return]

    def take_passed(self) -> tuple[socket.socket, Any]:
        """The next connection in the channel, with its client's address
        (``BlockingIOError``: none)."""
        record, ancillary, flags, _ = self.channel.recvmsg(_RECORD.size, _FD_SPACE)
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        if flags & socket.MSG_CTRUNC or not fds or len(record) != _RECORD.size:
            for fd in fds:
                os.close(fd)
            log.error(
                "statescale: a client connection passed to this worker was lost (%s); "
                "its client sees the connection close. Raise the open-files limit.",
                "out of file descriptors" if flags & socket.MSG_CTRUNC else "a short record",
            )
            raise BlockingIOError(errno.EAGAIN, "a passed connection came without its socket")
        try:
            flagged, port, packed = _RECORD.unpack(record)
            family = flagged & ~_PARTIAL
            size = 4 if family == socket.AF_INET else 16
            address = (socket.inet_ntop(family, packed[:size]), port)
            # Family and type given: the socket is made without asking the kernel.
            maker: type[socket.socket] = socket.socket if flagged & _PARTIAL else PassedSocket
            client = maker(family, socket.SOCK_STREAM, 0, fileno=fds[0])
        except (OSError, ValueError):
            for fd in fds:
                os.close(fd)
            raise BlockingIOError(errno.EAGAIN, "a passed connection was unreadable") from None
        for extra in fds[1:]:  # never sent, never leaked either
            os.close(extra)
        return client, address

    def close(self) -> None:
        self._epoll.close()
        self.channel.close()
        self.slot.close()

    def __repr__(self) -> str:
        return f"<slot listener: passed connections on fd {self.channel.fileno()}, {self.slot}>"


class Passer:
    """The router's side: accepts on ``listen`` itself, passes each connection that
    holds one whole request (:func:`whole_request`) to its slot's channel, and hands
    every other one to ``proxy`` (the router's ordinary client path)."""

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
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in _EXHAUSTED:  # the client's failure: the next one
                    continue
                # Out of descriptors or memory: rest, then go on.
                log.error("statescale router: accept failed (%s); pausing %gs", exc, ACCEPT_PAUSE)
                assert self._loop is not None
                self._loop.remove_reader(listen.fileno())
                self._loop.call_later(ACCEPT_PAUSE, self._resume, listen)
                return
            try:
                self.place(conn, peer)
            except Exception:  # a bug of ours: this connection ends, the router goes on
                log.exception("statescale router: placing a connection from %s failed", peer)
                conn.close()

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


#: A Cookie header line in a request head (the head starts with the request line, so
#: every header follows a CRLF), and a header that says a body follows.
_COOKIE_LINE = re.compile(rb"\r\ncookie:[ \t]*([^\r\n]*)", re.IGNORECASE)
_BODY_LINE = re.compile(rb"\r\n(content-length|transfer-encoding):[ \t]*([^\r\n]*)", re.IGNORECASE)


def peek_head(data: bytes, limit: int = PEEK_BYTES) -> tuple[bytes, bool] | None:
    """What a worker routing by itself reads of the bytes it peeked: the request's
    Cookie headers (joined with ``, ``, as gunicorn joins them; b"" if none), and
    whether ``data`` is that one request whole (its head, and the body its
    Content-Length announces, nothing more);
    None when the head has not arrived whole. A head longer than ``limit`` (the bytes
    peeked at most) is read as far as its last complete line. Only the choice of
    worker, and whether the close may skip lingering, ride on this: gunicorn's parser
    reads the request."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) < limit:
            return None
        last = data.rfind(b"\r\n")
        return b", ".join(_COOKIE_LINE.findall(data, 0, last + 2)), False
    cookie = b", ".join(_COOKIE_LINE.findall(data, 0, end + 2))
    body = len(data) - end - 4
    framing = _BODY_LINE.findall(data, 0, end + 2)
    if not framing:
        return cookie, body == 0
    if len(framing) == 1 and framing[0][0].lower() == b"content-length":
        length = framing[0][1].strip()
        return cookie, length.isdigit() and int(length) == body
    return cookie, False


#: An LF not after a CR, in a head: HTTP/1.1 wants CRLF, and gunicorn refuses the rest.
_BARE_LF = re.compile(rb"(?<!\r)\n")


def _hung_up(conn: socket.socket) -> bool:
    """Whether the client has shut its side (sent all it will send) or gone."""
    poller = select.poll()
    poller.register(conn, select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
               for _, events in poller.poll(0))  # fmt: skip


class Turns:
    """A round-robin count shared by the processes forked after it is made (an anonymous
    shared mapping), so workers that route among themselves take turns as one router
    would: each worker counting alone gave some workers more new sessions than others.
    Unlocked: two workers that read it at once pick the same slot, which only evens out
    a little less."""

    def __init__(self) -> None:
        self._count = mmap.mmap(-1, 8)

    def next(self, among: int) -> int:
        """The next turn, of ``among``."""
        n = int.from_bytes(self._count[:8], "little")
        self._count[:8] = ((n + 1) % among).to_bytes(8, "little")
        return n % among


class RoutingListener(SlotListener):
    """A sync worker's listener when the workers route among themselves
    (``STATESCALE_ROUTING=workers``: no router process). It accepts on gunicorn's
    public listener itself, as plain gunicorn's workers do, and peeks at each request
    (:func:`peek_head`): a connection whose session another slot owns goes to that
    slot's channel, as the router would have passed it; one without a session goes to
    the next slot in turn, so new sessions spread evenly. Its own channel brings the
    connections the other workers pass to it.

    Every request goes to its session's worker, as the router's do: a sticky session
    lives in that worker's memory alone, and an affinity session's parallel requests
    must not meet in two workers. So the peek waits up to ``HEAD_WAIT`` seconds for a
    head still arriving, a request whose body is still coming is passed too (its close
    then lingers, as gunicorn's does), and a full channel is waited on for up to
    ``PASS_WAIT`` seconds. Only a client that has not sent its head by then (or never
    can: a bare LF ends no head the peek reads, and a client that has shut its side
    sends no more; neither is waited for), or a worker whose channel stays full or
    refuses (the log says why), is served where it landed (a sticky session then
    starts afresh there). A request without a session does not wait for room: any
    worker may start it. One ``accept`` begins no pass after ``BATCH_TIME`` seconds, so
    that gunicorn's loop, and the worker's heartbeat, come round far inside its
    ``--timeout``.

    ``owner`` names the slot that owns the session of a Cookie header (None: no
    session cookie); ``running`` is false once the worker is stopping, when it accepts
    nothing more; ``turns``, the count all the workers share."""

    #: Connections passed on in one accept() before it returns to gunicorn's loop...
    BATCH = 16
    #: ...and seconds: past this, no more is begun, so that one call, slow heads and
    #: full channels included, stays far inside gunicorn's ``--timeout`` (the worker's
    #: heartbeat is sent from its loop).
    BATCH_TIME = 0.5
    #: Seconds a worker waits for a head still arriving (the router waits too, up to
    #: its header timeout; a sync worker waits on its client anyway).
    HEAD_WAIT = 2.0
    #: Seconds a worker waits for room in a full channel before it serves the request.
    PASS_WAIT = 1.0

    def __init__(
        self,
        channel: socket.socket,
        public: Any,
        me: str,
        peers: dict[str, socket.socket],
        *,
        owner: Callable[[bytes], str | None],
        running: Callable[[], bool] = lambda: True,
        turns: Turns | None = None,
    ) -> None:
        super().__init__(channel, public, public.getsockname())
        self.me = me
        self.peers = peers
        self.owner = owner
        self.running = running
        self.turns = Turns() if turns is None else turns
        self.passed = 0
        self._rotation = sorted([me, *peers])

    def _accepted(self) -> tuple[socket.socket, Any]:
        """The next connection on the public listener that this worker serves."""
        until = time.monotonic() + self.BATCH_TIME
        for _ in range(self.BATCH):
            if not self.running():  # stopping: what it accepted it passed on; no more
                break
            if time.monotonic() > until:
                break  # back to gunicorn's loop for a while: its heartbeat, its channel
            conn, peer = self.slot.accept()  # BlockingIOError: none waiting
            head = self._head(conn)
            if head is None or not self.running():
                # No whole head in time: gunicorn's parser judges it. Or the master
                # stopped while it came: its owner may be gone; served here, not left
                # unread in a channel to be reset.
                return conn, peer
            cookie, whole = head
            slot = self.owner(cookie) if cookie else None
            wait = self.PASS_WAIT  # a session's requests wait for its owner's room...
            if slot is None:  # no session yet: round robin, so new ones spread evenly
                slot = self._rotation[self.turns.next(len(self._rotation))]
                wait = 0  # ...a new one's need not: served here if that slot is full
            channel = self.peers.get(slot)
            failure = None
            if channel is not None:
                failure = passing_failure(channel, conn, peer, whole=whole, wait=wait)
                if failure is None:
                    conn.close()  # the owner's now
                    self.passed += 1
                    continue
            if failure is not None and wait:
                log.warning(
                    "statescale: a request of a session %s owns was served here: %s",
                    slot,
                    failure,
                )
            if whole:  # like a passed one, its close need not wait for the client's
                conn = PassedSocket(conn.family, socket.SOCK_STREAM, 0, fileno=conn.detach())
            return conn, peer
        raise BlockingIOError(errno.EAGAIN, "passed a batch on; gunicorn's loop goes round")

    def _head(self, conn: socket.socket) -> tuple[bytes, bool] | None:
        """:func:`peek_head` of what ``conn`` has sent, once its head is whole (waiting
        up to ``HEAD_WAIT``); None if it is not by then, or the client is gone."""
        deadline = 0.0
        size = PEEK_BYTES
        while True:
            try:
                data = conn.recv(size, _PEEK_FLAGS)
            except (BlockingIOError, InterruptedError):
                data = None  # nothing yet
            except OSError:
                return None  # reset: gunicorn meets the error and ends it
            if data == b"":
                return None  # closed before it said anything
            if data and len(data) == size < LONG_PEEK_BYTES and b"\r\n\r\n" not in data:
                size = LONG_PEEK_BYTES  # a long head: look at more of it first
                continue
            head = peek_head(data, size) if data else None
            if head is not None:
                return head
            if data and (_BARE_LF.search(data) or _hung_up(conn)):
                # A line ended by a bare LF never ends a head that peek_head reads
                # (gunicorn refuses it: a 400 at once), and a client that has sent all
                # it will send is not waited for: either way, gunicorn's parser judges.
                return None
            now = time.monotonic()
            deadline = deadline or now + self.HEAD_WAIT
            if now >= deadline:
                return None
            if data is None:  # wait for the first bytes
                select.select([conn], [], [], deadline - now)
            else:  # readable already (a peek takes nothing): look again shortly
                time.sleep(0.002)
