"""The Redis store, in layers (each module's docstring says more):

* :mod:`.client`: URLs to redis-py clients that fail fast;
* :mod:`.codec`: the one wire format of a session and of a write (pure);
* :mod:`.copies`: a process's versioned copies of records (pure);
* :mod:`.subscription`: statescale's own connections and the invalidations Redis sends
  (the only sockets and threads);
* :mod:`.breaker`: failing fast while Redis hangs;
* :mod:`.store`: :class:`RedisStore`, which puts them together.

Needs redis-py: ``pip install 'statescale[redis]'``.
"""

from __future__ import annotations

try:
    import redis as _redis  # noqa: F401 - only to say which extra is missing
except ImportError as exc:  # pragma: no cover - exercised by the import test
    raise ImportError(
        "statescale's Redis store needs redis-py: pip install 'statescale[redis]'"
    ) from exc

from .client import CLUSTER_SCHEME as CLUSTER_SCHEME
from .client import SENTINEL_SCHEME as SENTINEL_SCHEME
from .client import client_from_url as client_from_url
from .store import RedisStore as RedisStore
