"""gunicorn server hooks. Use them from a ``gunicorn.conf.py``::

    from statescale.gunicorn import (
        on_exit, on_starting, post_fork, pre_fork, when_ready,
        worker_abort, worker_exit, worker_int,
    )

or run ``gunicorn -c python:statescale.gunicorn ...``. The hooks read
:meth:`Settings.from_env <statescale.config.Settings.from_env>` once, in the master, and
hand what they decide to the workers as typed state (:func:`statescale.assemble.host`),
which every worker inherits when it is forked.

Shared mode (the default):

* with ``STATESCALE_EMBEDDED_REDIS=1`` and no ``STATESCALE_REDIS_URL``, ``on_starting``
  starts the deployment's one embedded ``redis-server`` in the master (or finds the one
  a ``--preload``\\ed app started), so every worker shares it. ``USR2`` is then refused:
  a new master could not inherit that server, and every session would be lost.
* ``when_ready`` warns loudly when the memory store runs under several workers without
  sticky routing (each worker would keep its own sessions).

Sticky and affinity modes (``STATESCALE_MODE=sticky|affinity gunicorn -w N -b
HOST:PORT APP``, with no ``STATESCALE_NODE``: an instance given a node name is one node
behind an outside balancer, and the hooks leave it alone), all under the one gunicorn
master (affinity keeps the sessions in Redis besides, as shared mode does):

* the master opens one listening Unix socket per worker slot, in a private directory
  (``$TMPDIR/statescale-<uid>/slots-<pid>``), and keeps it open for its whole life;
  slot ``k`` is node ``workerk`` of a rendezvous ring. Each worker accepts only on its slot's socket
  (``post_fork``), keeps sessions in its own memory (affinity: its copies of them)
  and mints session IDs the ring routes to itself.
* the master runs ``statescale router`` (``when_ready``) on gunicorn's own listener,
  handed over as an inherited file descriptor, which sends every request of a session to
  its slot. With sync workers (one request a connection) it passes the client's
  connection itself to the slot's worker, through a Unix socket pair per slot that the
  master keeps open (:mod:`statescale.routing.router.passing`), and proxies to the
  slot's socket only what it cannot route by a peek. The router dies with the master;
  a router that dies alone is logged and started again, as a worker would be
  (:func:`_supervise_router`).
* with ``STATESCALE_ROUTING=workers`` (sync workers only) there is no router: each
  worker accepts on gunicorn's listener, peeks, and passes a connection whose session
  another slot owns through that slot's channel
  (:class:`~statescale.routing.router.passing.RoutingListener`). A worker that stops
  gracefully first answers what the others passed it (``worker_exit``).
* a worker that exits (a crash, ``--max-requests``, a ``HUP`` reload) is replaced in the
  same slot (``pre_fork``). The slot's socket stays open meanwhile, so connections wait
  in its queue for the replacement instead of being refused: reloads and recycling fail
  no request. ``USR2`` starts a new master with slots and a router of its own on the
  same inherited listener; both serve until the old master is stopped.
* sticky mode (sessions in memory): a worker that stops gracefully (a reload,
  recycling, the old master's ``TERM`` after ``USR2``) hands its sessions to the next
  worker of its slot (``worker_exit``; :mod:`statescale.handoff`), so only a crash
  loses them.
* ``TTIN`` and ``TTOU`` are refused: two workers on one slot would split its sessions,
  and a slot without one would hold its sessions' requests forever.

``on_exit`` stops the router and the embedded server.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import assemble, embedded
from .config import Settings
from .exceptions import ConfigError
from .middleware import MULTIPROCESS_WARNING
from .processes import SharedFlag, die_with_parent, stop_process
from .routing.backends import Backend

if TYPE_CHECKING:
    from .routing.membership import Heartbeat

_FIXED_SLOTS = (
    "statescale: sticky mode has %d slots, fixed at start (every node's ring must agree); "
    "%s. Restart with a larger -w to scale."
)
_USR2_EMBEDDED = (
    "statescale: USR2 ignored: this deployment's sessions live in an embedded redis-server "
    "that a new master cannot inherit, so every session would be lost. Set "
    "STATESCALE_REDIS_URL to a Redis of your own to upgrade in place, or restart."
)


@dataclass
class _Slot:
    """One sticky worker slot: a node of the ring, with its listening socket."""

    backend: Backend
    socket: Any  # gunicorn.sock.UnixSocket, open in the master for its whole life
    workers: list[Any] = field(default_factory=list)  # the gunicorn Workers serving it
    #: Sync workers: the router's end and the workers' end of the slot's channel, a Unix
    #: socket pair the router passes client connections through (:mod:`.passing`).
    channel: tuple[socket.socket, socket.socket] | None = None


#: How soon a router that died is started again: see :class:`_Restarts`.
ROUTER_STABLE = 10.0
ROUTER_RESTART = 1.0
ROUTER_RESTART_MAX = 30.0


@dataclass
class _Restarts:
    """When the master may start its router again (:func:`_keep_router`). A router that
    dies after ``ROUTER_STABLE`` seconds or more is started again at once; one that
    dies sooner, or cannot start, after ``ROUTER_RESTART`` seconds, doubled each time
    up to ``ROUTER_RESTART_MAX``."""

    started: float = 0.0  # when the router running was started (time.monotonic)
    mourned: int | None = None  # the pid of the last router whose end was logged
    wait: float = 0.0  # how long the next start waits
    at: float = 0.0  # when it may come

    def died(self, pid: int, now: float) -> bool:
        """Router ``pid`` has ended: when to start the next. Whether that is news (the
        end of ``pid`` not yet logged)."""
        if self.mourned == pid:
            return False
        self.mourned = pid
        self.wait = 0.0 if now - self.started >= ROUTER_STABLE else self._longer()
        self.at = now + self.wait
        return True

    def failed(self, pid: int, now: float) -> None:
        """A start failed (router ``pid`` died at once, or none could be forked)."""
        self.mourned = pid  # its end is in the failure's message
        self.wait = self._longer()
        self.at = now + self.wait

    def _longer(self) -> float:
        return min(max(2 * self.wait, ROUTER_RESTART), ROUTER_RESTART_MAX)


@dataclass
class _Master:
    """What the hooks know in the master (and, by fork, in each worker)."""

    settings: Settings
    server: embedded.EmbeddedRedis | None = None  # the embedded Redis the master started
    handoff: Path | None = None  # sticky, memory: where slots hand sessions over
    slot_dir: Path | None = None  # where the slots' sockets are
    slots: list[_Slot] = field(default_factory=list)
    router: subprocess.Popen[bytes] | None = None
    #: A router being stopped on purpose (not started again), reaped with its status.
    retired: subprocess.Popen[bytes] | None = None
    restarts: _Restarts = field(default_factory=_Restarts)
    heartbeat: Heartbeat | None = None  # this instance's registration, if it has a registry
    #: STATESCALE_ROUTING=workers: the round-robin count its workers share
    #: (passing.Turns); None when a router process routes, or nothing does.
    turns: Any = None
    member: Backend | None = None  # how it registered itself (and its workers know it)
    #: Set in the master when it stops (TERM, INT, QUIT); its workers see it (shared).
    stopping: SharedFlag = field(default_factory=SharedFlag)

    @property
    def workers_route(self) -> bool:
        """Whether its workers route among themselves (no router process)."""
        return self.turns is not None


_master: _Master | None = None


def command() -> list[str]:
    """How to start gunicorn with this interpreter: its console script beside it.
    (``python -m gunicorn`` would not survive USR2, which re-executes the command line
    as a script, and ``gunicorn/__main__.py`` run as a script shadows the stdlib's
    ``http`` with gunicorn's own.)"""
    script = Path(sys.executable).with_name("gunicorn")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gunicorn"]


def on_starting(server: Any) -> None:
    global _master
    settings = Settings.from_env()
    _master = _Master(settings)
    if settings.registry is not None and settings.node is not None:
        _name_free(server, settings)
    if settings.routed and (settings.node is None or server.cfg.workers > 1):
        _prepare_sticky(server, _master)
    if settings.routing == "workers" and not _master.workers_route:
        server.log.warning(
            "statescale: STATESCALE_ROUTING=workers ignored: it routes among the workers "
            "of one master in sticky or affinity mode, and here %s",
            "no session is routed (shared mode)" if not settings.routed else "one worker serves",
        )
    if settings.registry is not None and server.cfg.preload_app:
        raise ConfigError(
            "STATESCALE_REGISTRY: drop --preload; each worker follows the registry from "
            "a thread of its own, which a preloaded app would start in the master only"
        )
    if settings.store_kind == "redis" and settings.redis_url is None and settings.embedded_redis:
        _master.server = embedded.shared()
        server.handle_usr2 = lambda: server.log.error(_USR2_EMBEDDED)
        server.log.info(
            "statescale: embedded redis-server at %s shared by all workers; it stops with "
            "gunicorn. Set STATESCALE_REDIS_URL to use your own.",
            _master.server.address,  # (its url holds its password)
        )


def _refuse_what_cannot_route(server: Any, master: _Master) -> None:
    """gunicorn options sticky and affinity modes cannot serve: a clear error at start,
    not requests that fail."""
    cfg, mode = server.cfg, master.settings.mode
    public = cfg.bind[0]
    by_workers = master.settings.routing == "workers"
    router = "the router in the master"
    proxy_protocol = getattr(cfg, "proxy_protocol", "off") not in ("off", False)
    refusals = (
        (
            cfg.preload_app,
            "sticky mode loads the app in each worker (to know its name): drop --preload",
        ),
        (
            len(cfg.bind) > 1,
            f"sticky and affinity modes route one listener, not {len(cfg.bind)}: give "
            "gunicorn a single -b HOST:PORT (the others would accept and never answer)",
        ),
        (
            public.startswith(("unix:", "fd://")) or ":" not in public,
            f"sticky mode needs a HOST:PORT bind for the router, not {public!r}",
        ),
        (
            cfg.reuse_port,
            f"{mode} mode: --reuse-port would give each worker a listener of its own, "
            "bypassing the routing; drop it",
        ),
        (
            not by_workers and cfg.is_ssl,
            f"{router} speaks plain HTTP: terminate TLS in front of gunicorn (nginx, "
            "HAProxy, a cloud balancer)",
        ),
        (
            not by_workers and proxy_protocol,
            f"{router} does not read PROXY protocol lines: drop --proxy-protocol, or use "
            "STATESCALE_ROUTING=workers",
        ),
        (
            by_workers and cfg.is_ssl,
            "STATESCALE_ROUTING=workers: the workers route by a peek at the request, which "
            "TLS hides; terminate TLS in front of gunicorn, or use STATESCALE_ROUTING=router",
        ),
        (
            by_workers and not _passes_connections(cfg.worker_class),
            "STATESCALE_ROUTING=workers: the workers pass connections among themselves, "
            "which only gunicorn's sync workers can take (one request a connection): "
            "drop --threads and --worker-class, or use STATESCALE_ROUTING=router",
        ),
        (
            by_workers
            and (
                getattr(cfg, "permit_obsolete_folding", False)
                or getattr(cfg, "strip_header_spaces", False)
            ),
            "STATESCALE_ROUTING=workers: the workers route by a peek that reads header "
            "lines as HTTP/1.1 writes them; with --permit-obsolete-folding or "
            "--strip-header-spaces gunicorn would read a Cookie the peek does not, and "
            "serve a session on a worker that does not hold it: drop them, or use "
            "STATESCALE_ROUTING=router",
        ),
        (
            by_workers and master.settings.node is not None,
            "STATESCALE_ROUTING=workers is for one master serving the whole ring; a node "
            "of a fleet (STATESCALE_NODE) routes to its workers with its router",
        ),
    )
    for refused, why in refusals:
        if refused:
            raise ConfigError(why)


def _prepare_sticky(server: Any, master: _Master) -> None:
    from gunicorn.sock import UnixSocket

    _refuse_what_cannot_route(server, master)
    public = server.cfg.bind[0]
    # Unix sockets: the router connects to a worker for every request (a sync worker
    # closes each connection), and a Unix connection costs a third less CPU than TCP's.
    # A sync worker answers one request a connection, so the router passes it the
    # client's connection instead, and proxies only what it cannot route by a peek.
    passing = _passes_connections(server.cfg.worker_class)
    by_workers = master.settings.routing == "workers"
    if by_workers:
        from .routing.router.passing import Turns

        master.turns = Turns()  # made before the fork: every worker shares it
    master.slot_dir = _private(f"slots-{os.getpid()}")
    for slot in range(server.cfg.workers):
        path = master.slot_dir / f"worker{slot}.sock"
        if len(str(path).encode()) > 100 or set(str(path)) & set("*,#= "):
            raise ConfigError(
                f"sticky mode's worker sockets would be at {path}: too long for a Unix "
                "socket, or holding * , # = or a space. Set TMPDIR to a short plain path."
            )
        sock = UnixSocket(str(path), server.cfg, server.log)
        channel = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) if passing else None
        backend = Backend(f"worker{slot}", f"unix:{path}", 0)
        master.slots.append(_Slot(backend, sock, channel=channel))
    backends = tuple(s.backend for s in master.slots)
    if master.settings.node is None:  # else the fleet's ring stays the node's
        assemble.host(assemble.Hosting(backends=backends, balancer="statescale"))
    if master.settings.store_kind == "memory":
        master.handoff = _handoff_root(public)

    _keep_the_slots(server, master)
    server.log.info(
        "statescale: %s mode, %d workers%s: %s",
        master.settings.mode,
        len(backends),
        " routing among themselves (no router process)" if master.workers_route else "",
        ", ".join(b.spec for b in backends),
    )


def _keep_the_slots(server: Any, master: _Master) -> None:
    """One worker a slot, for the master's whole life (every node's ring must agree),
    and a stop that lets the router drain first: the arbiter's handlers, by name."""

    def refuse_ttin() -> None:  # the arbiter looks its signal handlers up by name
        server.log.error(_FIXED_SLOTS, len(master.slots), "TTIN ignored")

    def refuse_ttou() -> None:  # a slot without a worker would queue its sessions forever
        server.log.error(_FIXED_SLOTS, len(master.slots), "TTOU ignored")

    graceful_stop, int_stop, quit_stop = server.handle_term, server.handle_int, server.handle_quit

    def stop_router_first() -> None:
        # The router drains its requests while the workers still serve them; stopped
        # after them, what it had queued at their sockets would be reset.
        master.stopping.set()
        _stop_router(server, master)
        graceful_stop()

    def stop_router_at_once(stop: Any) -> Any:
        def fast_stop() -> None:
            # INT, QUIT: the workers go now; the router must not accept on meanwhile
            # into channels nobody reads any more.
            master.stopping.set()
            _stop_router(server, master, grace=0.5)
            stop()

        return fast_stop

    manage = server.manage_workers

    def keep_one_worker_a_slot() -> None:
        if server.num_workers != len(master.slots):
            # gunicorn's control socket (gunicornc "worker add|remove"), or a HUP that
            # read another -w, changes the count past the TTIN/TTOU refusal: a slot
            # left without a worker holds its requests unanswered, two split its sessions.
            server.log.error(_FIXED_SLOTS, len(master.slots), "the change is undone")
            server.num_workers = len(master.slots)
        manage()

    server.handle_ttin = refuse_ttin
    server.handle_ttou = refuse_ttou
    server.manage_workers = keep_one_worker_a_slot  # (called by name each round)
    server.handle_term = stop_router_first
    server.handle_int = stop_router_at_once(int_stop)
    server.handle_quit = stop_router_at_once(quit_stop)


def _passes_connections(worker_class: Any) -> bool:
    """Whether the router may pass client connections to workers of this class: sync
    workers, which close each connection after one response (one kept alive would
    bring the worker requests of sessions that are not its own)."""
    from gunicorn.workers.sync import SyncWorker

    return isinstance(worker_class, type) and issubclass(worker_class, SyncWorker)


def _register(server: Any, master: _Master) -> None:
    """Register this instance (``STATESCALE_NODE`` at ``STATESCALE_ADVERTISE``, default
    the bind address) and keep it registered from a thread of the master's. A graceful
    stop (``TERM``) leaves the registry first, serves ``STATESCALE_DRAIN`` seconds more
    while routers and peers follow (they fetch the sessions that move from here), and,
    with a router in the master, on until requests cease; only then it stops the
    workers, which hand what is left to the next owners. ``INT`` and ``QUIT`` (fast
    stops) leave without the wait, or cut it short."""
    from .routing.membership import Heartbeat, open_registry

    settings = master.settings
    backend = _member(server, settings)
    master.member = backend
    master.heartbeat = Heartbeat(open_registry(settings.registry or ""), backend)
    master.heartbeat.start()
    server.log.info("statescale: registered %s in %s", backend.spec, settings.registry)
    for name in ("handle_term", "handle_int", "handle_quit"):
        graceful = name == "handle_term"
        setattr(server, name, _leaving_first(server, master, getattr(server, name), graceful))


def _member(server: Any, settings: Settings) -> Backend:
    """This instance as the registry holds it: ``STATESCALE_NODE`` at
    ``STATESCALE_ADVERTISE`` (default the bind address), ``STATESCALE_WEIGHT``."""
    advertise = settings.advertise or server.cfg.bind[0]
    backend = Backend.parse(f"{settings.node}={advertise}*{settings.weight}")
    if backend.host in ("0.0.0.0", "::", "[::]", ""):
        raise ConfigError(
            f"gunicorn binds {advertise}, which nobody can connect to: set "
            "STATESCALE_ADVERTISE=HOST:PORT, the address other instances reach this one at"
        )
    return backend


def _name_free(server: Any, settings: Settings) -> None:
    """At start, before anything listens: a name another live instance holds at
    another address is waited for one TTL, then refused, with a clean halt. (The
    registration in ``when_ready`` refuses it too, should another take it meanwhile.)"""
    from .routing.membership import open_registry, wait_for_name

    try:
        registry = open_registry(settings.registry or "")
        try:
            wait_for_name(registry, _member(server, settings))
        finally:
            registry.close()
    except ConfigError as exc:
        server.halt(reason=f"statescale: {exc}", exit_status=1)


def _leaving_first(server: Any, master: _Master, stop: Any, graceful: bool) -> Any:
    def leave_then_stop() -> None:
        heartbeat, master.heartbeat = master.heartbeat, None
        if heartbeat is not None and (server.reexec_pid or server.master_pid):
            # One master of a USR2 upgrade while the other runs: the old one (the new
            # has taken the name over), or the new one (a rollback: the old one serves on).
            heartbeat.stop(deregister=False)
        elif heartbeat is not None:
            if master.handoff is not None:  # its workers hand sessions to the fleet
                from .handoff import leaving_mark

                leaving_mark(master.handoff, os.getpid()).touch()
            heartbeat.stop(deregister=True)
            if graceful:
                drain = master.settings.drain
                server.log.info("statescale: left the registry; serving %g s more", drain)
                hurry = _serve_meanwhile(server, drain)
                if hurry is None:
                    hurry = _stop_router_when_quiet(server, master)
                if hurry is not None:  # INT or QUIT while it waited: stop at once
                    server.log.info("statescale: a fast stop cut the drain short")
                    getattr(server, hurry)()
                    return
        stop()

    return leave_then_stop


#: How often (seconds) the master, waiting while it leaves, does the arbiter's rounds.
HOUSEKEEPING = 0.2


def _serve_meanwhile(server: Any, seconds: float, done: Any = None) -> str | None:
    """Wait ``seconds`` at most (less if ``done()`` turns true) in the master, doing
    meanwhile what gunicorn's arbiter loop would: reap exited workers, kill those past
    ``--timeout`` and fork their replacements, so the node serves its drain in full.
    A fast stop (``INT``, ``QUIT``) that arrives meanwhile ends the wait: the name of
    its handler is returned (on a gunicorn that queues its signals, 24 or later; an
    older one handles them after the wait). Other signals are logged and dropped: it is
    stopping. Exited workers are reaped every round, not only on a ``SIGCHLD`` seen
    here: one may have come in the same batch as the ``TERM`` that started the wait."""
    deadline = time.monotonic() + seconds
    while not (done is not None and done()):
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        pending = getattr(server, "wait_for_signals", None)
        if pending is None:  # an older gunicorn, which reaps in its SIGCHLD handler
            time.sleep(min(left, HOUSEKEEPING))
        else:
            for sig in pending(timeout=min(left, HOUSEKEEPING)):
                if sig in (signal.SIGINT, signal.SIGQUIT):
                    return "handle_int" if sig == signal.SIGINT else "handle_quit"
                if sig != signal.SIGCHLD:
                    server.log.info("statescale: leaving; %s ignored", signal.Signals(sig).name)
            server.handle_chld()  # reaps without waiting
        server.murder_workers()
        server.manage_workers()
    return None


def pre_fork(server: Any, worker: Any) -> None:
    """Give the worker about to fork the slot with the fewest live workers: a dead
    worker's, or during a reload the slot of an old worker about to stop."""
    if _master is None or not _master.slots:
        return
    for slot in _master.slots:
        slot.workers = [w for w in slot.workers if w.pid in server.WORKERS]
    chosen = min(_master.slots, key=lambda s: len(s.workers))
    chosen.workers.append(worker)
    worker.statescale_slot = chosen


def post_fork(server: Any, worker: Any) -> None:
    """In the new worker: accept on its slot's socket only, and know its node name."""
    slot: _Slot | None = getattr(worker, "statescale_slot", None)
    if slot is None:
        if _master is not None and _master.member is not None:
            assemble.host(assemble.Hosting(member=_master.member))
        return
    assert _master is not None
    worker.sockets = [slot.socket]
    if slot.channel is not None and _master.workers_route:
        worker.sockets = [_routing_listener(server, _master, slot, worker)]
    elif slot.channel is not None:  # one listener for both: the worker need not select
        from .routing.router.passing import SlotListener

        public = server.LISTENERS[0].getsockname()
        worker.sockets = [SlotListener(slot.channel[1], slot.socket, public)]
    handoff = None if _master.handoff is None else _master.handoff / slot.backend.name
    slots = tuple(s.backend for s in _master.slots)
    if _master.settings.node is None:  # the master's workers are the whole ring
        hosting = assemble.Hosting(
            node=slot.backend.name, backends=slots, balancer="statescale", handoff=handoff
        )
    else:  # a node of a fleet: a ring of its own workers behind the fleet's
        hosting = assemble.Hosting(
            handoff=handoff, slot=slot.backend.name, slots=slots, member=_master.member
        )
    assemble.host(hosting)


def _routing_listener(server: Any, master: _Master, slot: _Slot, worker: Any) -> Any:
    """``STATESCALE_ROUTING=workers``: the worker's listener, which accepts on
    gunicorn's own and passes each connection to its session's slot."""
    from .cookies import cookie_value
    from .routing.balancers import get
    from .routing.router.passing import RoutingListener
    from .signing import routing_key

    assert slot.channel is not None
    ring = get("statescale").ring(tuple(s.backend for s in master.slots))
    name = master.settings.session.cookie.name.encode()
    peers = {s.backend.name: s.channel[0] for s in master.slots if s.channel and s is not slot}

    def owner(header: bytes) -> str | None:
        value = cookie_value(header, name)
        return ring.owner(routing_key(value)) if value else None

    return RoutingListener(
        slot.channel[1],
        server.LISTENERS[0],
        slot.backend.name,
        peers,
        owner=owner,
        running=lambda: bool(worker.alive),
        turns=master.turns,
    )


#: Seconds a stopping worker (``STATESCALE_ROUTING=workers``) waits for its channel to
#: stay empty: when the master stops, the other workers stop passing it connections
#: within microseconds of their own TERM, but one may be descheduled between its accept
#: and its pass. What is queued there is answered however long that takes, within
#: ``CHANNEL_SHARE`` of gunicorn's ``graceful_timeout``; the rest is for the sessions'
#: hand-over (sticky mode) and the exit. (No worker comes after it: the master stops.)
CHANNEL_QUIET = 0.3
CHANNEL_SHARE = 0.5


def _answer_passed(server: Any, worker: Any) -> None:
    """A worker that stops gracefully answers the connections the others passed it, so
    that none waits unanswered in its channel when the master stops."""
    # A worker that routes has imported the module; one that has not, has no channel
    # (and importing it here, asyncio and all, would cost every stop a tenth of a second).
    passing = sys.modules.get(f"{__package__}.routing.router.passing")
    listener = worker.sockets[0] if worker.sockets else None
    if passing is None or not isinstance(listener, passing.RoutingListener):
        return
    if not getattr(worker, "booted", False):
        return  # a worker that never booted leaves them to its slot's next one
    if getattr(worker, "statescale_hurried", False):
        return  # not a graceful stop: its slot's next worker takes them
    if _master is not None and not _master.stopping.is_set():
        # A reload or a recycle: its slot's next worker reads the same channel (a HUP's
        # is running already). Answered here too, one session's requests would be
        # served by two workers at once: in affinity mode, an update lost.
        return
    start = time.monotonic()
    deadline = start + server.cfg.graceful_timeout * CHANNEL_SHARE
    quiet_until = start + CHANNEL_QUIET
    while (left := min(quiet_until, deadline) - time.monotonic()) > 0:
        try:
            client, address = listener.take_passed()
        except BlockingIOError:
            select.select([listener.channel], [], [], left)  # until one is passed
            continue
        client.setblocking(True)
        worker.handle(listener, client, address)
        quiet_until = time.monotonic() + CHANNEL_QUIET


def worker_int(worker: Any) -> None:
    """A worker told to stop at once (``INT``, ``QUIT``) answers nothing more."""
    worker.statescale_hurried = True


def worker_abort(worker: Any) -> None:
    """A worker past its ``--timeout`` (``SIGABRT``, then ``SIGKILL``) answers nothing
    more: what is queued in its channel waits for its replacement instead."""
    worker.statescale_hurried = True


def worker_exit(server: Any, worker: Any) -> None:
    """In a worker that stops gracefully: answer what the other workers passed it, then
    hand its sessions to its slot's next worker."""
    _answer_passed(server, worker)
    handoff = sys.modules.get(f"{__package__}.handoff")
    if handoff is not None:  # (not imported: this worker holds nothing to hand over)
        handoff.stop_all()


def _handoff_root(bind: str) -> Path:
    """The hand-off directories of the deployment on ``bind``: private to this user,
    and the same for the next master of a USR2 upgrade."""
    return _private("handoff-" + bind.replace(":", "-").strip("[]"))


def _private(name: str) -> Path:
    """A directory of this user's alone under ``$TMPDIR/statescale-<uid>``."""
    from .handoff import private_directory

    base = private_directory(Path(tempfile.gettempdir()) / f"statescale-{os.getuid()}")
    return private_directory(base / name)


def when_ready(server: Any) -> None:
    if _master is not None and _master.workers_route:
        # Accept once the request has come (as the router does): the peek finds it.
        # (Not TCP, or not Linux: the peek waits for it instead.)
        with contextlib.suppress(OSError, AttributeError):
            server.LISTENERS[0].setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
    elif _master is not None and _master.slots:
        _supervise_router(server, _master)  # first: a router that fails at once is reaped
        _start_router(server, _master)  # with its status
    if _master is not None and _master.settings.registry is not None:
        # Now that it listens (and its router runs): routers may send it requests.
        try:
            _register(server, _master)
        except ConfigError as exc:  # (a name taken): said in one line, and a clean stop
            server.halt(reason=f"statescale: {exc}", exit_status=1)
    if _master is not None and _master.slots:
        return
    settings = _master.settings if _master is not None else Settings.from_env()
    if settings.store_kind == "memory" and server.cfg.workers > 1:
        server.log.warning(MULTIPROCESS_WARNING, "the memory store (STATESCALE_STORE=memory)")


def _start_router(server: Any, master: _Master) -> None:
    """``statescale router`` on gunicorn's own listener (an inherited descriptor), in
    front of the slots; the kernel stops it if the master dies."""
    listener = server.LISTENERS[0]
    fd = listener.fileno()
    host, port = listener.getsockname()[:2]
    backends = [a for s in master.slots for a in ("--backend", s.backend.spec)]
    channels = {s.backend.name: s.channel[0].fileno() for s in master.slots if s.channel}
    passes = [a for name, end in channels.items() for a in ("--pass", f"{name}={end}")]
    cookie = master.settings.session.cookie.name
    command = [
        *die_with_parent(),
        sys.executable,
        "-m",
        "statescale",
        "router",
        *backends,
        "--fd",
        str(fd),
        "--cookie",
        cookie,
        "--check-interval",
        "0.5",
        "--grace",  # what is in flight gets as long as gunicorn gives its workers
        str(server.cfg.graceful_timeout),
        *passes,
    ]
    master.router = subprocess.Popen(command, pass_fds=(fd, *channels.values()))
    try:  # a router that cannot start (a missing extra, say) must not go unnoticed
        code = master.router.wait(0.5)
    except subprocess.TimeoutExpired:
        pass
    else:
        raise ConfigError(
            f"statescale router exited at once (status {code}); nothing would serve "
            f"{host}:{port}. Is the router extra installed? pip install 'statescale[gunicorn]'"
        )
    master.restarts.started = time.monotonic()
    server.log.info(
        "statescale: sticky router on http://%s:%d/ (pid %d)", host, port, master.router.pid
    )


def _supervise_router(server: Any, master: _Master) -> None:
    """The master keeps its router alive as it keeps its workers. A router that dies
    (``kill -9``, the OOM killer, a bug) is logged with how it ended and started again
    on the same listener and channels; only the connections it held are lost. Its exit
    status is read before gunicorn's ``waitpid(-1)`` would reap it as an unknown child
    (which leaves nothing to read)."""
    reap, manage = server.reap_workers, server.manage_workers

    def reap_the_router_first() -> None:
        for router in (master.router, master.retired):
            if router is not None:
                router.poll()
        reap()

    def manage_workers_and_router() -> None:
        manage()
        _keep_router(server, master)

    # The arbiter calls these by name, each round and on SIGCHLD.
    server.reap_workers = reap_the_router_first
    server.manage_workers = manage_workers_and_router


def _keep_router(server: Any, master: _Master) -> None:
    """Start another router if the one running has died (not one stopped on purpose:
    :func:`_stop_router` and :func:`_stop_router_when_quiet` take it off first). Called
    each round of the arbiter's loop, never from a signal handler."""
    router, restarts = master.router, master.restarts
    if router is None or router.poll() is None:
        return
    if restarts.died(router.pid, time.monotonic()):
        later = f" in {restarts.wait:g} s" if restarts.wait else ""
        server.log.error(
            "statescale: the router (pid %d) %s; starting another%s",
            router.pid,
            _ended(router),
            later,
        )
    if time.monotonic() < restarts.at:
        return
    master.router = None
    try:
        _start_router(server, master)
    except (ConfigError, OSError) as exc:  # it died at start (or could not be forked)
        if master.router is None:
            master.router = router  # the dead one stands for it until the next try
        restarts.failed(master.router.pid, time.monotonic())
        server.log.error("statescale: %s; next try in %g s", exc, restarts.wait)


def _ended(process: subprocess.Popen[bytes]) -> str:
    """How ``process``, which has ended, ended."""
    code = process.returncode
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _stop_router_when_quiet(server: Any, master: _Master) -> str | None:
    """Leaving the fleet for good: the router serves on while connections still arrive
    (a balancer slow to reload still sends some; stopped under them, the listener would
    queue them until this master exits, and then reset them), and stops once they have
    ceased (SIGUSR1; see :mod:`statescale.routing.router.serve`). What
    :func:`_serve_meanwhile` returns."""
    router = master.router
    if router is None or router.poll() is not None:
        return None
    from .routing.router.serve import QUIET

    master.router, master.retired = None, router  # stopping: not to be started again
    router.send_signal(signal.SIGUSR1)
    # Its wait for quiet, then for what is in flight: its grace (gunicorn's graceful
    # timeout) each at most.
    grace = server.cfg.graceful_timeout
    hurry = _serve_meanwhile(server, 2 * grace + QUIET + 2, lambda: router.poll() is not None)
    master.retired = None
    if router.poll() is None:
        master.router = router  # stopped the ordinary way next
        return hurry
    if router.returncode:
        server.log.error("statescale: the router %s", _ended(router))
    return hurry


def _stop_router(server: Any, master: _Master, grace: float | None = None) -> None:
    """SIGTERM the router: it stops accepting and finishes what is in flight (its
    ``--grace`` is gunicorn's graceful timeout), killed ``grace`` seconds later."""
    router, master.router = master.router, None
    if router is None or router.poll() is not None:
        return
    master.retired = router
    stop_process(router, server.cfg.graceful_timeout + 1 if grace is None else grace)
    master.retired = None


def on_exit(server: Any) -> None:
    if _master is None:
        return
    if _master.heartbeat is not None:
        _master.heartbeat.stop(deregister=not server.reexec_pid)
    if _master.handoff is not None:
        from .handoff import leaving_mark

        leaving_mark(_master.handoff, os.getpid()).unlink(missing_ok=True)
    _stop_router(server, _master)
    if _master.slot_dir is not None:
        shutil.rmtree(_master.slot_dir, ignore_errors=True)
    if _master.server is not None:
        _master.server.stop()
