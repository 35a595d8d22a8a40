"""The router's limits and their defaults, defined once (the CLI shows them in --help
without loading the router, which needs the router extra)."""

from __future__ import annotations

from dataclasses import dataclass

from ...exceptions import ConfigError

GRACE = 10.0  # seconds, by default, for what is in flight at a stop
MAX_BODY = 8 * 1024 * 1024  # bytes of a request body the router buffers, at most
#: Bytes a second a request body must average once the body timeout has passed since it
#: began (as Apache's mod_reqtimeout MinRate), and to keep its connection when the
#: connection cap is reached: one byte every few seconds holds a slot no longer.
MIN_BODY_RATE = 1024


@dataclass(frozen=True)
class Timeouts:
    """Seconds the router waits, each at most. The defaults follow nginx's spirit and
    stay well under 30 s: a client cannot hold a connection by sending nothing."""

    idle: float = 15.0  # for the first byte of a request (a new or kept-alive connection)
    header: float = 10.0  # from the first byte of a request to the end of its head
    body: float = 30.0  # between two pieces of a request body
    connect: float = 1.0  # to connect to a node
    response: float = 60.0  # for a node's response to begin, and between its pieces

    def __post_init__(self) -> None:
        for name in ("idle", "header", "body", "connect", "response"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"the router's {name} timeout must be > 0 seconds")
