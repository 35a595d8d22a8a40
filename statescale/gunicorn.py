"""gunicorn server hooks. Use them from a ``gunicorn.conf.py``::

    from statescale.gunicorn import on_exit, on_starting, post_fork, pre_fork, when_ready

Shared mode (the default):

* ``on_starting`` (in the master, before any worker forks): with the Redis store and no
  ``STATESCALE_REDIS_URL``, start one embedded ``redis-server`` and hand its URL to every
  worker through the environment, so all workers share it.
* ``when_ready``: warn loudly when the memory store runs under several workers without
  sticky routing (each worker would keep its own sessions).

Sticky mode (``STATESCALE_MODE=sticky gunicorn -w N -b HOST:PORT APP``, with no
``STATESCALE_NODE``: an instance given a node name is one node behind an outside
balancer, and the hooks leave it alone), all under the one gunicorn master:

* every worker slot gets a private loopback port and a node name (``worker0`` ...);
  each worker listens on its slot's port (``post_fork``), keeps sessions in its own
  memory and mints session IDs the ring routes to itself;
* the master starts ``statescale router`` on HOST:PORT (``when_ready``), which sends
  every request of a session to the worker that owns it;
* a worker that dies is re-forked into the same slot (``pre_fork``), so it owns the same
  sessions again (they start afresh: its memory went with it);
* ``--preload`` is refused: each worker must load the app knowing its own name.

``on_exit`` stops the router and the embedded server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any

from .config import Settings
from .embedded import EmbeddedRedis, free_port
from .exceptions import ConfigError
from .middleware import MULTIPROCESS_WARNING

_FIXED_SLOTS = (
    "statescale: sticky mode has %d slots, fixed at start (every node's ring must agree); "
    "%s. Restart with a larger -w to scale."
)
_embedded: list[EmbeddedRedis] = []
_sticky: dict[str, Any] = {}  # in the master: public address, slot ports, slot -> worker


def on_starting(server: Any) -> None:
    settings = Settings.from_env()
    if settings.mode == "sticky" and settings.node is None:
        _prepare_sticky(server)
        return
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


def _prepare_sticky(server: Any) -> None:
    if server.cfg.preload_app:
        raise ConfigError(
            "sticky mode loads the app in each worker (to know its name): drop --preload"
        )
    public = server.cfg.bind[0]
    host, _, port = public.rpartition(":")
    if public.startswith("unix:") or not host or not port.isdigit():
        raise ConfigError(f"sticky mode needs a HOST:PORT bind for the router, not {public!r}")
    ports = [free_port() for _ in range(server.cfg.workers)]
    specs = [f"worker{slot}=127.0.0.1:{p}" for slot, p in enumerate(ports)]
    os.environ.setdefault("STATESCALE_STORE", "memory")
    os.environ["STATESCALE_BALANCER"] = "statescale"
    os.environ["STATESCALE_BACKENDS"] = ",".join(specs)
    # gunicorn's own listener moves out of the way (nothing connects to it); the router
    # takes the public address and each worker gets a private port.
    private = os.path.join(tempfile.mkdtemp(prefix="statescale-"), "unused.sock")
    server.cfg.set("bind", [f"unix:{private}"])
    _sticky.update(public=public, ports=ports, specs=specs, slots={}, router=None)

    def refuse_ttin() -> None:  # the arbiter looks its signal handlers up by name
        server.log.error(_FIXED_SLOTS, len(ports), "TTIN ignored")

    server.handle_ttin = refuse_ttin
    server.log.info("statescale: sticky mode, %d workers: %s", len(ports), ", ".join(specs))


def pre_fork(server: Any, worker: Any) -> None:
    """Give the worker about to fork the lowest free slot (a dead worker's, if any)."""
    if not _sticky:
        return
    slots: dict[int, Any] = _sticky["slots"]
    free = [
        s
        for s in range(len(_sticky["ports"]))
        if slots.get(s) is None or slots[s].pid not in server.WORKERS
    ]
    if not free:  # more workers than slots by some way other than TTIN (refused above)
        server.log.error(_FIXED_SLOTS, len(_sticky["ports"]), "not adding a worker")
        server.num_workers = len(_sticky["ports"])
        worker.statescale_slot = None
        return
    slots[free[0]] = worker
    worker.statescale_slot = free[0]


def post_fork(server: Any, worker: Any) -> None:
    """In the new worker: listen on its slot's port, and know its name."""
    if not _sticky:
        return
    from gunicorn.sock import TCPSocket

    slot = worker.statescale_slot
    if slot is None:  # refused in pre_fork: leave quietly, the arbiter will not replace us
        sys.exit(0)
    worker.sockets = [TCPSocket(("127.0.0.1", _sticky["ports"][slot]), server.cfg, server.log)]
    os.environ["STATESCALE_NODE"] = f"worker{slot}"


def when_ready(server: Any) -> None:
    if _sticky:
        args = [a for spec in _sticky["specs"] for a in ("--backend", spec)]
        _sticky["router"] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "statescale",
                "router",
                *args,
                "--listen",
                _sticky["public"],
                "--check-interval",
                "0.5",
            ],
        )
        server.log.info(
            "statescale: sticky router on http://%s/ (pid %d)",
            _sticky["public"],
            _sticky["router"].pid,
        )
        return
    settings = Settings.from_env()
    if settings.store == "memory" and server.cfg.workers > 1:
        server.log.warning(MULTIPROCESS_WARNING, "the memory store (STATESCALE_STORE=memory)")


def on_exit(server: Any) -> None:
    router = _sticky.get("router")
    if router is not None and router.poll() is None:
        router.terminate()
        router.wait(15)
    while _embedded:
        _embedded.pop().stop()
