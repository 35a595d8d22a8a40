"""The demo app with ``GET /api/slow``: a quarter second of work, then ``/api/session``'s
answer. For tests that need requests to take a while (``app="tests.slow_app:app"``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from demo_app import create_app

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

SLOW = 0.25  # seconds

app = create_app()
_inner = app.wsgi_app


def _slow(environ: WSGIEnvironment, start_response: StartResponse) -> Any:
    if environ.get("PATH_INFO") == "/api/slow":
        time.sleep(SLOW)
        environ["PATH_INFO"] = "/api/session"
    return _inner(environ, start_response)


app.wsgi_app = _slow  # type: ignore[method-assign]
