"""``statescale router``: a sticky reverse proxy for development and single-box use, and
the router inside the gunicorn master in sticky mode.

* :mod:`.http1`: HTTP/1.1 framing on llhttp; what it cannot frame one way only is 400;
* :mod:`.proxy`: membership, the ring, health, the relay of one request;
* :mod:`.admin`: the token-protected admin endpoint;
* :mod:`.serve`: listeners, client connections and their limits, signals.

Needs the ``router`` extra (httptools; uvloop for speed).
"""

from __future__ import annotations

from .proxy import Membership as Membership
from .proxy import Router as Router
from .proxy import Timeouts as Timeouts
from .serve import Server as Server
from .serve import run as run
