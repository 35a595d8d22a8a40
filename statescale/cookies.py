"""Reading the session cookie and writing ``Set-Cookie``. Pure; werkzeug does the parsing."""

from __future__ import annotations

from werkzeug.http import dump_cookie, parse_cookie

from .config import CookieOptions

_PLACEHOLDER = "statescalePLACEHOLDER"


def read_cookies(cookie_header: str | None, *names: str) -> list[str | None]:
    """The first value of each cookie in ``names`` in a ``Cookie`` header (``None``
    where absent), from one parse of the header."""
    if not cookie_header or names[0] not in cookie_header:
        return [None] * len(names)
    try:
        cookies = parse_cookie(cookie_header)
    except UnicodeDecodeError:  # werkzeug raises on non-UTF-8 bytes: treat as no cookie
        return [None] * len(names)
    return [cookies.get(name) for name in names]


def read_cookie(cookie_header: str | None, name: str) -> str | None:
    """The first value of cookie ``name`` in a ``Cookie`` header, or ``None``."""
    return read_cookies(cookie_header, name)[0]


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
