"""gunicorn server hooks. Use them from a ``gunicorn.conf.py``::

    from statescale.gunicorn import on_exit, on_starting, when_ready

* ``on_starting`` (in the master, before any worker forks): with the Redis store and no
  ``STATESCALE_REDIS_URL``, start one embedded ``redis-server`` and hand its URL to every
  worker through the environment, so all workers share it.
* ``when_ready``: warn loudly when the memory store runs under several workers without
  sticky routing (each worker would keep its own sessions).
* ``on_exit``: stop the embedded server.
"""

from __future__ import annotations

import os
from typing import Any

from .config import Settings
from .embedded import EmbeddedRedis
from .middleware import MULTIPROCESS_WARNING

_embedded: list[EmbeddedRedis] = []


def on_starting(server: Any) -> None:
    settings = Settings.from_env()
    if settings.store != "redis" or settings.redis_url:
        return
    redis = EmbeddedRedis().start()
    _embedded.append(redis)
    os.environ["STATESCALE_REDIS_URL"] = redis.url
    server.log.info(
        "statescale: started an embedded redis-server at %s (pid %s) shared by all workers; "
        "it stops with gunicorn. Set STATESCALE_REDIS_URL to use your own.",
        redis.url,
        redis.process.pid if redis.process else "?",
    )


def when_ready(server: Any) -> None:
    settings = Settings.from_env()
    if settings.store == "memory" and settings.mode != "sticky" and server.cfg.workers > 1:
        server.log.warning(MULTIPROCESS_WARNING, "the memory store (STATESCALE_STORE=memory)")


def on_exit(server: Any) -> None:
    while _embedded:
        _embedded.pop().stop()
