"""``statescale router``: a sticky reverse proxy for development and single-box use, and
the router the gunicorn master starts beside it in sticky mode.

* :mod:`.http1`: HTTP/1.1 framing on llhttp; what it cannot frame one way only is 400;
* :mod:`.proxy`: membership, the ring, health, the relay of one request;
* :mod:`.admin`: the token-protected admin endpoint;
* :mod:`.serve`: listeners, client connections and their limits, signals.

Needs the ``router`` extra (httptools; uvloop for speed); :mod:`.limits` does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .limits import MAX_BODY as MAX_BODY
from .limits import Timeouts as Timeouts

if TYPE_CHECKING:
    from .proxy import Membership as Membership
    from .proxy import Router as Router
    from .serve import Server as Server
    from .serve import run as run


def __getattr__(name: str) -> Any:  # the parts that need httptools, on first use
    if name in ("Membership", "Router"):
        from . import proxy

        return getattr(proxy, name)
    if name in ("Server", "run"):
        from . import serve

        return getattr(serve, name)
    raise AttributeError(name)
