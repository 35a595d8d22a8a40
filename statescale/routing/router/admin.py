"""The router's admin endpoint: ``GET /nodes``, ``POST /nodes?name=N&addr=H:P[&weight=W]``
(add a node, or move one), ``DELETE /nodes?name=N``.

Every request needs ``Authorization: Bearer TOKEN`` (``STATESCALE_ADMIN_TOKEN``): 401
without it, 403 with another token. A browser page cannot send that header to another
origin without a CORS preflight, which this endpoint never grants. It listens on
loopback unless told otherwise. A change is built whole and checked before it takes
effect, so a refused one (the last node removed, a bad address) leaves the membership
as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from urllib.parse import parse_qs, urlsplit

from ...exceptions import ConfigError
from ..backends import Backend
from .http1 import BadRequest, RequestHead, RequestParser
from .proxy import Router

log = logging.getLogger("statescale.router")

HEAD_TIMEOUT = 5.0  # seconds an admin request's head may take


class Admin:
    """Serves the admin endpoint for ``router``; ``token`` is required of every request."""

    def __init__(self, router: Router, token: str) -> None:
        if len(token) < 16:
            raise ConfigError(
                "the admin token must be at least 16 characters: set STATESCALE_ADMIN_TOKEN "
                "to e.g. the output of python -c 'import secrets; print(secrets.token_urlsafe())'"
            )
        self.router = router
        self._expected = f"Bearer {token}".encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            parser = RequestParser()
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await _read_head(parser, reader)
            if head is None:
                writer.close()
                return
            status, body = self.answer(head)
        except BadRequest as exc:
            status, body = exc.status, {"error": exc.reason}
        except TimeoutError:
            status, body = 408, {"error": "request head too slow"}
        except ConnectionError:
            writer.close()
            return
        data = json.dumps(body).encode()
        writer.write(
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    def answer(self, head: RequestHead) -> tuple[int, dict[str, object]]:
        """The status and JSON body for one admin request."""
        given = [v for n, v in head.headers if n.lower() == b"authorization"]
        if not given:
            return 401, {"error": "send Authorization: Bearer TOKEN (STATESCALE_ADMIN_TOKEN)"}
        if len(given) != 1 or not hmac.compare_digest(given[0].strip(), self._expected):
            return 403, {"error": "wrong admin token"}
        url = urlsplit(head.target.decode("latin-1"))
        args = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path != "/nodes":
            return 404, {"error": "use /nodes"}
        router, method = self.router, head.method
        try:
            if method == b"GET":
                return 200, router.describe()
            if method == b"POST":
                spec = f"{args.get('name', '')}={args.get('addr', '')}*{args.get('weight', '1')}"
                router.set_membership(router.membership.with_backend(Backend.parse(spec)))
            elif method == b"DELETE":
                router.set_membership(router.membership.without(args.get("name", "")))
            else:
                return 405, {"error": "GET, POST ?name=&addr=[&weight=] or DELETE ?name="}
        except ConfigError as exc:
            return 409, {"error": f"{exc}; membership unchanged", **router.describe()}
        log.warning("statescale router: membership now %s", ", ".join(router.members))
        return 200, router.describe()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
}


async def _read_head(parser: RequestParser, reader: asyncio.StreamReader) -> RequestHead | None:
    """The next request head on an admin connection; ``None`` when the client closed
    it (the caller bounds the wait as a whole)."""
    while not parser.events:
        data = await reader.read(65536)
        if not data:
            return None
        parser.feed(data)
    event = parser.events.popleft()
    if not isinstance(event, RequestHead):  # cannot be: a head comes first
        raise BadRequest(400, "malformed request")
    return event
