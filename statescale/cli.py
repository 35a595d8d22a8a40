"""The ``statescale`` command line. ``main(argv)`` returns the exit status."""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import __version__
from .config import MODES
from .exceptions import ConfigError, StateScaleError
from .signing import DEFAULT_COOKIE_NAME

if TYPE_CHECKING:
    from .routing.backends import Backend
    from .routing.membership import Registry

DESCRIPTION = """\
statescale keeps WSGI session state consistent across gunicorn workers and machines,
with a shared Redis store or sticky routing. Commands (each takes --help):

  cluster    serve an app under gunicorn -w N in shared, sticky or affinity mode
  lb-config  print an nginx or HAProxy configuration for sticky sessions
  lb-sync    keep an nginx or HAProxy configuration to a registry, reloading it
  router     run the built-in sticky reverse proxy
  redis      run a private redis-server on a free loopback port until Ctrl-C
"""


def cmd_redis(args: argparse.Namespace) -> int:
    from .embedded import EmbeddedRedis

    with EmbeddedRedis(port=args.port) as server:
        print(f"redis-server running: STATESCALE_REDIS_URL={server.url}  (Ctrl-C stops it)")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while server.process is not None and server.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_lb_config(args: argparse.Namespace) -> int:
    from .routing.backends import parse_backends
    from .routing.balancers import get

    backends = parse_backends(args.backend)
    balancer = get(args.balancer)
    # Every backend given, or an error saying why not (a registry's followers leave
    # out what the balancer cannot serve, and go on; a list given here is fixed).
    balancer.make_ring({balancer.node_key(b): b.weight for b in backends})
    sys.stdout.write(balancer.config(backends, listen=args.listen, cookie=args.cookie))
    specs = shlex.quote(",".join(b.spec for b in backends))
    print(
        f"# Start each instance with STATESCALE_MODE=sticky STATESCALE_STORE=memory "
        f"STATESCALE_BALANCER={args.balancer} STATESCALE_BACKENDS={specs}{_cookie_env(args)} "
        "STATESCALE_NODE=<its name>, so it mints session IDs this balancer routes to it.",
        file=sys.stderr,
    )
    return 0


def cmd_lb_sync(args: argparse.Namespace) -> int:
    import threading
    from pathlib import Path

    from .routing.balancers import get
    from .routing.membership import Follower, open_registry
    from .routing.membership.sync import RETRY, ConfigSync

    balancer = get(args.balancer)
    config = Path(args.config).resolve()
    sync = ConfigSync(balancer, config, listen=args.listen, cookie=args.cookie, say=_say)
    registry = open_registry(args.registry)
    if not sync.apply(_first_members(registry, args.wait)):
        raise ConfigError(f"no configuration written to {config} (see above)")
    if args.once and not sync.applied:
        raise ConfigError(f"{config} is written, but {balancer.name} was not reloaded (see above)")
    command = shlex.join(balancer.command(config, listen=args.listen, cookie=args.cookie))
    print(f"serve it with: {command}", flush=True)
    print(
        f"start each instance with STATESCALE_MODE=sticky (or affinity) "
        f"STATESCALE_BALANCER={args.balancer} STATESCALE_REGISTRY={shlex.quote(args.registry)}"
        f"{_cookie_env(args)} STATESCALE_NODE=<its name>",
        flush=True,
    )
    if args.once:
        return 0
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    follower = Follower(registry, sync.apply).start()
    while not stop.wait(RETRY):
        sync.retry()
    follower.stop()
    return 0


def _cookie_env(args: argparse.Namespace) -> str:
    """The instances' cookie setting, when ``--cookie`` is not the default."""
    if args.cookie == DEFAULT_COOKIE_NAME:
        return ""
    return f" STATESCALE_COOKIE_NAME={shlex.quote(args.cookie)}"


def _positive(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return number


def _say(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host, int(port)


def cmd_router(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .config import admin_token
    from .routing.backends import Backend, check, read_backends_file
    from .routing.router import Router, Timeouts, run

    if not args.backend and not args.backends_file and not args.registry:
        raise StateScaleError(
            "give --registry URL, --backend NAME=HOST:PORT (repeat) or --backends-file"
        )
    backends = [Backend.parse(spec, unix=True) for spec in args.backend or []]
    if args.backends_file:
        backends += read_backends_file(Path(args.backends_file))
    registry = None
    if args.registry:
        from .routing.membership import open_registry

        registry = open_registry(args.registry)
        backends = backends or _first_members(registry, args.wait)
    specs = [b.spec for b in check(backends)]
    router = Router(
        backends,
        cookie=args.cookie,
        ip_hash=args.ip_hash,
        timeouts=Timeouts(
            idle=args.idle_timeout, header=args.header_timeout, body=args.body_timeout
        ),
        check_interval=args.check_interval,
        backends_file=Path(args.backends_file) if args.backends_file else None,
        max_body=args.max_body,
        half_close=not args.no_half_close,
    )
    listen: tuple[str, int] | socket.socket = args.listen
    if args.fd is not None:
        listen = socket.socket(fileno=args.fd)
    passes = _passes(args.passes or [], {b.name for b in backends}, listen)
    host, port = listen.getsockname()[:2] if isinstance(listen, socket.socket) else listen
    print(
        f"statescale router on http://{host}:{port}/ -> {', '.join(specs)}"
        + (f"; admin on http://{args.admin[0]}:{args.admin[1]}/nodes" if args.admin else ""),
        flush=True,
    )
    run(
        router,
        listen,
        args.admin,
        admin_token=admin_token(),
        admin_remote=args.admin_remote,
        max_connections=args.max_connections,
        use_uvloop=not args.no_uvloop,
        registry=registry,
        passes=passes,
        grace=args.grace,
    )
    return 0


def _passes(
    specs: list[str], names: set[str], listen: tuple[str, int] | socket.socket
) -> dict[str, socket.socket]:
    """``--pass NAME=FD`` options: the channel to pass NAME's connections through."""
    passes: dict[str, socket.socket] = {}
    for spec in specs:
        name, _, fd = spec.partition("=")
        if name not in names or not fd.isdigit():
            raise ConfigError(f"--pass {spec!r}: give NAME=FD, NAME one of the --backend nodes")
        passes[name] = socket.socket(fileno=int(fd))
    if passes and not isinstance(listen, socket.socket):
        raise ConfigError("--pass needs --fd: connections are passed from an inherited listener")
    return passes


def _first_members(registry: Registry, wait: float) -> list[Backend]:
    """The registry's members, once it lists one (``wait`` seconds at most)."""
    from .routing.membership import RegistryUnavailable

    deadline = time.monotonic() + wait
    said = 0.0
    while True:
        try:
            members = registry.members()
        except RegistryUnavailable as exc:
            members, why = [], str(exc)
        else:
            why = "no node has registered yet"
        if members:
            return members
        if time.monotonic() >= deadline:
            raise StateScaleError(f"{registry.url}: {why} (waited {wait:g} s; see --wait)")
        if time.monotonic() - said >= 5:
            print(f"waiting for nodes in {registry.url}: {why}", file=sys.stderr, flush=True)
            said = time.monotonic()
        time.sleep(0.2)


def cmd_cluster(args: argparse.Namespace) -> int:
    import os

    host, port = args.bind
    env = {**os.environ, "STATESCALE_MODE": args.mode}
    embedded = MODES[args.mode] == "redis" and not env.get("STATESCALE_REDIS_URL")
    if embedded:  # gunicorn's environment: its hooks start one server for every worker
        env["STATESCALE_EMBEDDED_REDIS"] = "1"
    from .gunicorn import command as gunicorn_command

    command = [
        *gunicorn_command(),
        "-w",
        str(args.workers),
        "-b",
        f"{host}:{port}",
        "-c",
        "python:statescale.gunicorn",
        args.app,
    ]
    where = {
        "shared": "a Redis store shared by all workers"
        + (" (an embedded redis-server: set STATESCALE_REDIS_URL for yours)" if embedded else ""),
        "sticky": "the sticky router in front, each worker keeping its sessions in memory",
        "affinity": "the sticky router in front of a Redis store, each worker keeping copies"
        + (" (an embedded redis-server: set STATESCALE_REDIS_URL for yours)" if embedded else ""),
    }[args.mode]
    print(f"statescale cluster: {args.workers} workers of {args.app}, {where}.")
    print(f"Point a browser at http://{host}:{port}/  (Ctrl-C stops it)", flush=True)
    os.execve(command[0], command, env)  # noqa: S606 - gunicorn takes our place: signals reach it


def _router_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``statescale router``'s options."""
    from .routing.router.limits import GRACE, MAX_BODY, MIN_BODY_RATE, Timeouts

    router = sub.add_parser(
        "router",
        help="run the built-in sticky reverse proxy",
        description="A reverse proxy that sends every request of a session to the node the "
        "rendezvous ring gives for its session ID (start each node with "
        "STATESCALE_BALANCER=statescale, the same STATESCALE_BACKENDS and its STATESCALE_NODE). "
        "Requests without a session go round robin (or by client IP with --ip-hash). A node "
        "that refuses connections is taken out at once; a check brings it back. Ambiguous "
        "HTTP framing is refused with 400; request bodies are read whole before they go on. "
        "SIGHUP re-reads --backends-file; SIGTERM finishes requests in flight, then stops; "
        "SIGUSR1 serves on until no request has come for 0.5 s, then stops as SIGTERM does. "
        "The admin endpoint needs STATESCALE_ADMIN_TOKEN (sent as Authorization: Bearer).",
    )
    router.add_argument(
        "--backend",
        action="append",
        metavar="NAME=HOST:PORT[*WEIGHT]",
        help="one node (repeat, in a fixed order); NAME=unix:/PATH for a Unix socket",
    )
    router.add_argument("--backends-file", help="one NAME=HOST:PORT a line; re-read on SIGHUP")
    router.add_argument(
        "--registry",
        metavar="URL",
        help="follow the membership in this registry (redis://..., etcd://HOST:PORT, "
        "file:///PATH): each change takes effect within a second or two",
    )
    router.add_argument(
        "--wait",
        type=float,
        default=30.0,
        help="with --registry and no --backend: seconds to wait for a first node (default 30)",
    )
    router.add_argument(
        "--listen",
        type=_address,
        default=("127.0.0.1", 8080),
        help="HOST:PORT (default 127.0.0.1:8080)",
    )
    router.add_argument(
        "--fd",
        type=int,
        help="serve on this inherited, listening socket instead of --listen (what the "
        "gunicorn hooks pass in sticky mode)",
    )
    router.add_argument(
        "--pass",
        dest="passes",
        action="append",
        metavar="NAME=FD",
        help="with --fd: pass the client connections of NAME's sessions through this "
        "inherited Unix socket to the process that serves them, instead of proxying them "
        "(what the gunicorn hooks do for their sync workers; repeat for each node)",
    )
    router.add_argument(
        "--admin",
        type=_address,
        help="HOST:PORT (loopback) for GET/POST/DELETE /nodes; needs STATESCALE_ADMIN_TOKEN",
    )
    router.add_argument(
        "--admin-remote",
        action="store_true",
        help="let --admin bind an address other than loopback",
    )
    router.add_argument(
        "--cookie",
        default=DEFAULT_COOKIE_NAME,
        help=f"the session cookie's name (default {DEFAULT_COOKIE_NAME})",
    )
    router.add_argument(
        "--ip-hash", action="store_true", help="route requests without a session by client IP"
    )
    router.add_argument(
        "--check-interval",
        type=float,
        default=1.0,
        help="seconds between checks of down nodes (default 1)",
    )
    router.add_argument(
        "--idle-timeout",
        type=float,
        default=Timeouts.idle,
        help=f"seconds a connection may wait for a request (default {Timeouts.idle:g})",
    )
    router.add_argument(
        "--header-timeout",
        type=float,
        default=Timeouts.header,
        help="seconds from a request's first byte to the end of its head "
        f"(default {Timeouts.header:g})",
    )
    router.add_argument(
        "--body-timeout",
        type=float,
        default=Timeouts.body,
        help="seconds between two pieces of a request body; past it since the body "
        f"began, the body must average {MIN_BODY_RATE} bytes a second "
        f"(default {Timeouts.body:g})",
    )
    router.add_argument(
        "--grace",
        type=float,
        default=GRACE,
        help=f"seconds what is in flight may take to finish at a stop (default {GRACE:g})",
    )
    router.add_argument(
        "--max-connections",
        type=int,
        help="client connections at once (default: what the file-descriptor limit allows)",
    )
    router.add_argument(
        "--max-body",
        type=int,
        default=MAX_BODY,
        help=f"bytes of a request body, at most (default {MAX_BODY}; more is 413)",
    )
    router.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop")
    router.add_argument(
        "--no-half-close",
        action="store_true",
        help="never half-close a request to a node that closes every connection after one "
        "response (by default the router does, so that such a node, gunicorn's sync worker "
        "among them, need not wait for the router's close before its next request; a node "
        "that closes its first half-closed request unanswered gets none again)",
    )
    router.set_defaults(func=cmd_router)


def _balancer_options(parser: argparse.ArgumentParser) -> None:
    """What a balancer's configuration takes besides its backends."""
    parser.add_argument(
        "--listen", default="127.0.0.1:8080", help="address:port to listen on (default %(default)s)"
    )
    parser.add_argument(
        "--cookie",
        default=DEFAULT_COOKIE_NAME,
        help="the session cookie's name (default %(default)s)",
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="statescale",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version=f"statescale {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")

    cluster = sub.add_parser(
        "cluster",
        help="serve an app under gunicorn -w N in shared, sticky or affinity mode",
        description="Run APP (module:variable) under gunicorn with statescale's hooks. shared: "
        "every worker uses one Redis (an embedded one unless STATESCALE_REDIS_URL is set). "
        "sticky: every worker keeps sessions in memory and statescale router on --bind sends "
        "each session to its worker. affinity: the router as in sticky, in front of one "
        "Redis as in shared; each worker serves its sessions' reads from its copies.",
    )
    cluster.add_argument("mode", choices=list(MODES))
    cluster.add_argument("app", help="the WSGI app, MODULE:VARIABLE (e.g. demo_app:app)")
    cluster.add_argument(
        "--workers", type=_positive, default=4, help="gunicorn workers (default: 4)"
    )
    cluster.add_argument(
        "--bind",
        type=_address,
        default=("127.0.0.1", 8000),
        help="HOST:PORT (default 127.0.0.1:8000)",
    )
    cluster.set_defaults(func=cmd_cluster)

    from .routing import balancers

    lb = sub.add_parser(
        "lb-config",
        help="print a balancer's configuration for sticky sessions",
        description="Print a complete configuration for a balancer that routes each session "
        "to one backend by its session ID: "
        + "; ".join(f"{name}: {balancers.get(name).summary}" for name in balancers.names())
        + ". statescale replicates every one of these rings exactly, so each instance, told "
        "the same backends (STATESCALE_BACKENDS, in this order) and its own name "
        "(STATESCALE_NODE), mints IDs the balancer routes to it.",
    )
    lb.add_argument("balancer", choices=balancers.names())
    lb.add_argument(
        "--backend",
        action="append",
        required=True,
        metavar="NAME=HOST:PORT[*WEIGHT]",
        help="one instance (repeat, in a fixed order)",
    )
    _balancer_options(lb)
    lb.set_defaults(func=cmd_lb_config)

    sync = sub.add_parser(
        "lb-sync",
        help="keep an nginx or HAProxy configuration to a registry's membership",
        description="Write the balancer's configuration for the registry's members (as "
        "lb-config does), then rewrite it and reload the balancer (nginx -s reload; "
        "HAProxy's seamless reload, USR2 to its master) at each membership change, within "
        "a second or two. A new configuration that the balancer's own check refuses is "
        "not applied. Start the balancer with the command it prints; start each instance "
        "with the same STATESCALE_REGISTRY and STATESCALE_BALANCER.",
    )
    sync.add_argument("balancer", choices=["nginx", "haproxy"])
    sync.add_argument("--registry", required=True, metavar="URL", help="redis://, etcd://, file://")
    sync.add_argument("--config", required=True, metavar="FILE", help="the file to keep")
    _balancer_options(sync)
    sync.add_argument(
        "--wait", type=float, default=30.0, help="seconds to wait for a first node (default 30)"
    )
    sync.add_argument("--once", action="store_true", help="write the file once and exit")
    sync.set_defaults(func=cmd_lb_sync)

    _router_parser(sub)

    redis = sub.add_parser(
        "redis",
        help="run a private redis-server on loopback",
        description="Run redis-server on 127.0.0.1 (a free port unless --port) until Ctrl-C; "
        "nothing is kept on disk.",
    )
    redis.add_argument("--port", type=int, help="port (default: a free one)")
    redis.set_defaults(func=cmd_redis)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command is None:
        parser().print_help()
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        status: int = args.func(args)
    except StateScaleError as exc:
        print(f"statescale: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status
