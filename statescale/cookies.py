"""Reading the session cookie and writing ``Set-Cookie``. Pure.

Reading is deliberately simple: the header is split on ``;`` alone (RFC 6265 5.4), and a
pair counts when its name is exactly ours. statescale's own values are URL-safe text
that holds no ``;``, ``,``, ``"`` or ``=``, so nothing else the header carries (another
application's cookies, an unbalanced quote, bytes that are not UTF-8, a duplicate of our
name with another value) can hide one. Writing renders the attributes once, with
werkzeug.

A client may send several ``Cookie`` lines (a browser sends one), which gunicorn joins
with ``, ``: a value of ours ends at a comma, and statescale's router joins them the same
way, so the session the app reads is the one its request was routed by. nginx and
HAProxy join them with ``; `` and forward that one line, which they hashed. The header is
not split on commas: a comma in another cookie's value (written raw by a script) must
not make a pair of ours.
"""

from __future__ import annotations

import re

from werkzeug.http import dump_cookie

from .config import CookieOptions

_PLACEHOLDER = "statescalePLACEHOLDER"


def cookie_values(cookie_header: str | None, name: str) -> list[str]:
    """Every value of cookie ``name`` in a ``Cookie`` header, in the order sent (a
    browser sends the most specific path first), surrounding DQUOTEs removed."""
    if not cookie_header or name not in cookie_header:
        return []
    found = []
    for pair in cookie_header.split(";"):
        key, sep, value = pair.partition("=")
        if sep and key.strip() == name:
            value = value.partition(",")[0].strip()  # (a joined Cookie line after it)
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            found.append(value)
    return found


def read_cookie(cookie_header: str | None, name: str) -> str | None:
    """The first value of cookie ``name`` in a ``Cookie`` header, or ``None``."""
    values = cookie_values(cookie_header, name)
    return values[0] if values else None


class CookieWriter:
    """Builds ``Set-Cookie`` values. The attributes are rendered once, here."""

    def __init__(self, options: CookieOptions) -> None:
        rendered = dump_cookie(
            options.name,
            _PLACEHOLDER,
            max_age=options.max_age,
            path=options.path,
            domain=options.domain,
            secure=options.secure,
            httponly=options.httponly,
            samesite=options.samesite,
        )
        self._head, self._tail = rendered.split(_PLACEHOLDER, 1)
        self.clear = dump_cookie(
            options.name,
            "",
            max_age=0,
            expires=0,
            path=options.path,
            domain=options.domain,
            secure=options.secure,
            httponly=options.httponly,
            samesite=options.samesite,
        )

    def set(self, value: str) -> str:
        """``Set-Cookie`` for a signed session ID (URL-safe text: needs no quoting)."""
        return f"{self._head}{value}{self._tail}"


_SIGNED = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\Z")  # the shape of ID.SIGNATURE


def cookie_value(header: bytes, name: bytes) -> str | None:
    """The first value of cookie ``name`` in a Cookie header that has the shape of a
    signed session ID (read as the middleware reads it): what every
    router, and the peer-to-peer client, routes by. Junk under the same name before it
    does not move the session to another node. (A router cannot check signatures; a
    planted value of the right shape can still move it, and the session then starts
    afresh there: a nuisance, never a takeover.)"""
    if name not in header:
        return None
    for pair in header.split(b";"):
        key, sep, value = pair.partition(b"=")
        if sep and key.strip() == name:
            value = value.partition(b",")[0].strip()
            if len(value) >= 2 and value[:1] == value[-1:] == b'"':
                value = value[1:-1]
            if _SIGNED.match(value):
                return value.decode("ascii")
    return None
