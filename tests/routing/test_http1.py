"""The router's framing, bytes in and bytes out: what reaches a node and a client."""

from __future__ import annotations

from statescale.routing.router.http1 import (
    END,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    forwarded_request,
    forwarded_response,
)


def request_head(data: bytes) -> RequestHead:
    parser = RequestParser()
    parser.feed(data)
    head = parser.events.popleft()
    assert isinstance(head, RequestHead)
    return head


def response_head(data: bytes) -> ResponseHead:
    parser = ResponseParser(head_only=False)
    parser.feed(data)
    head = parser.events.popleft()
    assert isinstance(head, ResponseHead)
    return head


def lines(message: bytes) -> list[bytes]:
    return message.split(b"\r\n\r\n")[0].split(b"\r\n")


def test_a_request_goes_on_with_its_end_to_end_headers_and_exact_framing() -> None:
    head = request_head(
        b"POST /x?y=1 HTTP/1.1\r\nHost: h\r\nCookie: a=1\r\nX-Forwarded-For: 6.6.6.6\r\n"
        b"Connection: keep-alive\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
    )
    sent = forwarded_request(head, 5, b"X-Forwarded-For: 127.0.0.1\r\n")
    assert lines(sent) == [
        b"POST /x?y=1 HTTP/1.1",
        b"Host: h",
        b"Cookie: a=1",
        b"Content-Length: 5",
        b"X-Forwarded-For: 127.0.0.1",  # the router's, never the client's
    ]
    assert sent.endswith(b"\r\n\r\n")


def test_headers_a_connection_header_names_stay_on_their_hop() -> None:
    head = request_head(
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
        b"X-End: 2\r\nconnection: x-other\r\nX-Other: 3\r\n\r\n"
    )
    assert lines(forwarded_request(head, 0, b"")) == [b"GET / HTTP/1.1", b"Host: h", b"X-End: 2"]
    response = response_head(
        b"HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nX-End: 2\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    assert lines(forwarded_response(response, chunked=False, keep_alive=True)) == [
        b"HTTP/1.1 200 OK",
        b"X-End: 2",
        b"Content-Length: 0",
        b"Connection: keep-alive",
    ]


def test_a_response_is_framed_anew_for_the_client() -> None:
    data = (
        b"HTTP/1.1 201 Created\r\nServer: gunicorn\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    parser = ResponseParser(head_only=False)
    parser.feed(data)
    head = parser.events.popleft()
    assert isinstance(head, ResponseHead)
    assert list(parser.events) == [b"{}", END] and parser.complete and not parser.keep_alive
    assert lines(forwarded_response(head, chunked=False, keep_alive=True)) == [
        b"HTTP/1.1 201 Created",
        b"Server: gunicorn",
        b"Content-Type: application/json",
        b"Content-Length: 2",
        b"Connection: keep-alive",
    ]
    assert lines(forwarded_response(head, chunked=True, keep_alive=False))[-2:] == [
        b"Transfer-Encoding: chunked",
        b"Connection: close",
    ]


def test_a_response_coded_but_not_chunked_ends_when_the_node_closes() -> None:
    parser = ResponseParser(head_only=False)
    parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabcdef")
    head = parser.events.popleft()
    assert isinstance(head, ResponseHead)
    assert parser.until_close and head.length == -1 and not head.chunked
    assert list(parser.events) == [b"abcdef"]  # and on, until the node closes
    chunked = ResponseParser(head_only=False)
    chunked.feed(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    head = chunked.events.popleft()
    assert isinstance(head, ResponseHead) and head.chunked and not chunked.until_close
    assert list(chunked.events) == [b"abc", END]


# -- what an independent review found (each test failed on the code before) -------------


def test_a_trailer_is_bounded_as_a_head_is() -> None:
    # llhttp holds a trailer field whole, and built it a copy per read: one endless
    # trailer held every client's requests up for seconds.
    import pytest

    from statescale.routing.router.http1 import MAX_HEAD, BadRequest

    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    parser.feed(b"5\r\nhello\r\n0\r\nX-T: ")
    with pytest.raises(BadRequest) as refused:
        for _ in range(2 * MAX_HEAD // 4096 + 2):
            parser.feed(b"A" * 4096)
    assert refused.value.status == 431


def test_what_a_trusted_proxy_would_set_never_comes_from_the_client() -> None:
    # gunicorn trusts its loopback peer, the router, for SCRIPT_NAME and PATH_INFO
    # headers and the X-Forwarded-* ones: a client's own must not pass as the router's.
    head = request_head(
        b"GET /admin/users HTTP/1.1\r\nHost: h\r\nSCRIPT_NAME: /admin\r\nPATH_INFO: /x\r\n"
        b"Forwarded: for=6.6.6.6\r\nX-Forwarded-Host: evil\r\nX-Forwarded-Ssl: on\r\n"
        b"X-Forwarded-Protocol: ssl\r\nX-Forwarded-Port: 443\r\nX-Kept: 1\r\n\r\n"
    )
    assert head.lines == [b"Host: h", b"X-Kept: 1"]


def test_a_connection_header_naming_a_header_lets_no_proxy_header_through() -> None:
    # The headers are filtered afresh when Connection names one: the proxy headers a
    # client may not set stay out then too.
    head = request_head(
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: X-Hop\r\nX-Hop: 1\r\nSCRIPT_NAME: /admin\r\n"
        b"X-Forwarded-Host: evil\r\nX-Kept: 2\r\n\r\n"
    )
    assert head.lines == [b"Host: h", b"X-Kept: 2"]


def test_a_cookie_that_connection_names_is_neither_forwarded_nor_routed_by() -> None:
    head = request_head(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: cookie\r\nCookie: s=a.b\r\n\r\n")
    assert head.lines == [b"Host: h"] and head.cookie == b""
    kept = request_head(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\nCookie: s=a.b\r\n\r\n")
    assert kept.lines == [b"Host: h", b"Cookie: s=a.b"] and kept.cookie == b"s=a.b"
