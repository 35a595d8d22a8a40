"""HTTP/1.1 framing for the router: strict parsing on llhttp (through httptools), one
normalized framing out. Pure: bytes in, events out; :mod:`.proxy` does the I/O.

A request the router cannot frame one way only is refused with 400, and the router reads
a request whole before it sends any of it on, so no node, however lenient, ever sees
one (RFC 9112 6.1 and 6.3; nginx and HAProxy refuse them too): Content-Length beside
Transfer-Encoding, repeated or malformed Content-Length, any Transfer-Encoding but
``chunked``, a Transfer-Encoding in HTTP/1.0, malformed chunk sizes (``+5``, ``0x5``,
``0_5``), bare CR or LF line ends, obsolete line folding, a missing or repeated Host.
What goes on to a node is framed by the router itself: a request body with its exact
Content-Length, a response body as it came or re-chunked; hop-by-hop headers are
dropped.

Events, in order, for each message: a head (:class:`RequestHead` or
:class:`ResponseHead`), then body pieces (``bytes``), then ``END``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

try:
    import httptools
except ImportError as exc:  # pragma: no cover - the router extra installs it
    raise ImportError(
        "statescale router needs httptools: pip install 'statescale[router]'"
    ) from exc

MAX_HEAD = 64 * 1024  # bytes of a request head, at most
MAX_HEADERS = 100
END = None  # the event that ends a message

#: Never forwarded: hop-by-hop (RFC 9110 7.6.1), framing (the router frames anew), and
#: what the router sets itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"transfer-encoding",
        b"content-length",
        b"expect",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        # What a server behind a trusted proxy believes (gunicorn trusts loopback by
        # default): the client's word for scheme, host or address must not pass as ours.
        b"forwarded",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-ssl",
        b"x-forwarded-protocol",
    }
)


class BadRequest(Exception):
    """A request the router refuses; ``status`` is what the client gets."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # as received, less nothing
    lines: list[bytes]  # the end-to-end ones, as "Name: value" lines to forward
    keep_alive: bool
    has_body: bool  # Content-Length > 0 or chunked
    length: int  # the Content-Length, or -1 when chunked or absent
    expect_continue: bool
    cookie: bytes  # every Cookie header, joined with ", " as gunicorn joins them
    http11: bool  # HTTP/1.1 (else 1.0: no chunked response, the body ends by closing)
    hop_named: bool = False  # Connection names headers: the lines lack them


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    lines: list[bytes]  # the end-to-end ones, as "Name: value" lines to forward
    keep_alive: bool
    length: int  # the Content-Length, or -1
    chunked: bool


Event = RequestHead | ResponseHead | bytes | None


class _Parser:
    """What requests and responses share: the event queue and the callbacks."""

    def __init__(self) -> None:
        self.events: deque[Event] = deque()
        self.in_message = False  # a message has begun and not ended
        self._headers: list[tuple[bytes, bytes]] = []
        self._size = 0
        self._error: BadRequest | None = None

    def on_message_begin(self) -> None:
        self.in_message = True
        self._headers = []
        self._size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._size += len(name) + len(value) + 4
        if len(self._headers) >= MAX_HEADERS or self._size > MAX_HEAD:
            self._fail(BadRequest(431, "request head too large"))
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.events.append(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        self.events.append(END)

    def _fail(self, error: BadRequest) -> None:
        self._error = error
        raise error


class RequestParser(_Parser):
    """Requests from one client connection, pipelined or not."""

    def __init__(self) -> None:
        super().__init__()
        self._parser = httptools.HttpRequestParser(self)
        self._target = b""
        self._in_head = True  # between the end of a message and the end of the next head
        self._head_bytes = 0
        self._quiet = 0  # bytes fed since the last event (a trailer, a chunk's extensions)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._target = b""

    def on_url(self, url: bytes) -> None:
        self._target += url
        if len(self._target) > MAX_HEAD:
            self._fail(BadRequest(414, "request target too long"))

    def feed(self, data: bytes) -> None:
        """Parse ``data``; :class:`BadRequest` for anything not framed one way only, or
        a head over ``MAX_HEAD`` bytes (counted as fed: llhttp buffers a header whole)."""
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD + len(data) and not self.events:
                raise BadRequest(431, "request head too large")
        made = len(self.events)  # (only feed appends to it, and nothing takes meanwhile)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise BadRequest(501, "protocol upgrades are not supported") from None
        except httptools.HttpParserError as exc:
            if self._error is not None:
                raise self._error from None
            raise BadRequest(400, str(exc) or type(exc).__name__) from None
        # After the head, bytes that make no event (a chunked body's trailer, a chunk
        # size's extensions) are held by llhttp whole: bounded as a head is.
        self._quiet = 0 if len(self.events) != made else self._quiet + len(data)
        if self._quiet > MAX_HEAD and not self._in_head:
            raise BadRequest(431, "request trailer too large")

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        version = parser.get_http_version()
        encodings: list[bytes] = []
        lengths: list[bytes] = []
        cookies: list[bytes] = []
        connection: list[bytes] = []
        lines: list[bytes] = []
        hosts = 0
        expect = False
        for name, value in self._headers:  # one pass: this runs for every request
            lowered = name.lower()
            if lowered in HOP_BY_HOP:
                if lowered == b"transfer-encoding":
                    encodings.append(value.strip().lower())
                elif lowered == b"content-length":
                    lengths.append(value)
                elif lowered == b"expect":
                    expect = value.strip().lower() == b"100-continue"
                elif lowered == b"connection":
                    connection.append(value)
                continue
            if b"_" in name:  # SCRIPT_NAME, PATH_INFO: gunicorn takes those from a proxy
                continue
            if lowered == b"cookie":
                cookies.append(value)
            elif lowered == b"host":
                hosts += 1
            lines.append(name + b": " + value)
        if encodings and (version != "1.1" or encodings != [b"chunked"]):
            self._fail(BadRequest(400, "only Transfer-Encoding: chunked, in HTTP/1.1"))
        if hosts > 1 or (hosts == 0 and version == "1.1"):
            self._fail(BadRequest(400, "an HTTP/1.1 request carries exactly one Host"))
        method = parser.get_method()
        if method == b"CONNECT":
            self._fail(BadRequest(405, "CONNECT is not supported"))
        length = int(lengths[0]) if lengths else -1
        named = _named(connection)
        self.events.append(
            RequestHead(
                method=method,
                target=self._target,
                headers=self._headers,
                lines=_end_to_end(lines, named),
                keep_alive=parser.should_keep_alive(),
                has_body=bool(encodings) or length > 0,
                length=-1 if encodings else length,
                expect_continue=expect,
                # (a Cookie that Connection names is not forwarded: not routed by either)
                cookie=b"" if b"cookie" in named else b", ".join(cookies),
                http11=version == "1.1",
                hop_named=bool(named),
            )
        )


class ResponseParser(_Parser):
    """One node's responses on one connection. ``head_only``: the request was HEAD, so
    the response ends with its head whatever it says of a body."""

    def __init__(self, *, head_only: bool) -> None:
        super().__init__()
        self._parser = httptools.HttpResponseParser(self)
        self._reason = b""
        self.head_only = head_only
        self.until_close = False  # the current response's body ends when the node closes
        self.keep_alive = False  # the last response head let the connection be reused
        self.complete = False  # a final (not 1xx) response has ended
        self._final = False

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def feed(self, data: bytes) -> None:
        """Parse ``data``; ``ValueError`` for a response that cannot be framed (or
        switches protocols: the router relays HTTP only)."""
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            raise ValueError(f"malformed response: {exc!r}") from None

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.complete = self.complete or self._final

    def on_headers_complete(self) -> None:
        parser, headers = self._parser, self._headers
        lengths: list[bytes] = []
        connection: list[bytes] = []
        lines: list[bytes] = []
        encoded = chunked = False
        for name, value in headers:  # one pass: this runs for every response
            lowered = name.lower()
            if lowered in HOP_BY_HOP:
                if lowered == b"content-length":
                    lengths.append(value)
                elif lowered == b"transfer-encoding":
                    # Chunked only if that is the last coding; any other ends at the
                    # node's close (RFC 9112 6.3), and either way no length counts.
                    encoded = True
                    chunked = value.rpartition(b",")[2].strip().lower() == b"chunked"
                elif lowered == b"connection":
                    connection.append(value)
                continue
            lines.append(name + b": " + value)
        status = parser.get_status_code()
        self.keep_alive = parser.should_keep_alive()
        self.events.append(
            ResponseHead(
                status=status,
                reason=self._reason,
                headers=headers,
                lines=_end_to_end(lines, _named(connection)),
                keep_alive=self.keep_alive,
                length=int(lengths[0]) if lengths and not encoded else -1,
                chunked=chunked,
            )
        )
        self._reason = b""
        self._final = status >= 200
        if self.head_only and self._final:
            self.in_message = False
            self.complete = True
            self.events.append(END)
        else:
            self.until_close = (
                status >= 200
                and status not in (204, 304)
                and not chunked
                and (encoded or not lengths)
            )


def forwarded_request(head: RequestHead, body_length: int, extra: bytes) -> bytes:
    """The head the router sends a node: HTTP/1.1, end-to-end headers only, the exact
    Content-Length of the body it read whole, and ``extra`` (header lines, each ending
    in CRLF)."""
    lines = _lines(head.lines)
    if head.has_body or head.length >= 0:
        lines += b"Content-Length: %d\r\n" % body_length
    return b"%b %b HTTP/1.1\r\n%b%b\r\n" % (head.method, head.target, lines, extra)


def forwarded_response(head: ResponseHead, *, chunked: bool, keep_alive: bool) -> bytes:
    """The head the router sends its client for ``head``: the node's status and
    end-to-end headers, the router's own framing and connection."""
    if chunked:
        framing = b"Transfer-Encoding: chunked\r\n"
    elif head.length >= 0:
        framing = b"Content-Length: %d\r\n" % head.length
    else:
        framing = b""
    return b"HTTP/1.1 %d %b\r\n%b%bConnection: %b\r\n\r\n" % (
        head.status,
        head.reason,
        _lines(head.lines),
        framing,
        b"keep-alive" if keep_alive else b"close",
    )


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body (never empty: that would end it)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def reply(status: int, reason: str, body: str, *, close: bool = True) -> bytes:
    """A short plain-text answer of the router's own."""
    data = body.encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(data)}\r\nCache-Control: no-store\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    ).encode() + data


REASONS = {
    400: "Bad Request",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def _lines(lines: list[bytes]) -> bytes:
    """Header lines, each ending in CRLF."""
    return b"\r\n".join(lines) + b"\r\n" if lines else b""


def _named(connection: list[bytes]) -> frozenset[bytes]:
    """The header names that ``connection`` (a message's Connection values) makes
    hop-by-hop for this message (RFC 9110 7.6.1): usually none, answered without
    splitting; ``keep-alive`` and ``close`` name nothing more."""
    if not connection or (len(connection) == 1 and connection[0].lower() in _CONNECTION_OPTIONS):
        return _NONE
    tokens = {t.strip().lower() for value in connection for t in value.split(b",")}
    return frozenset(tokens - _CONNECTION_OPTIONS)


def _end_to_end(lines: list[bytes], named: frozenset[bytes]) -> list[bytes]:
    """``lines`` (``name: value``) less the headers ``named`` by Connection."""
    if not named:
        return lines
    return [line for line in lines if line.partition(b":")[0].lower() not in named]


_NONE: frozenset[bytes] = frozenset()
_CONNECTION_OPTIONS = frozenset({b"keep-alive", b"close", b""})
