"""``python -m benchmarks.compare``: every way to keep sessions across ``gunicorn -w 4``,
side by side.

All configurations run at once on loopback (real gunicorn, real Redis, real balancers);
the measurements alternate between them round by round, because these machines are
noisy, and each figure is the median with its min-max.

* **throughput** and **latency percentiles** of a read-heavy mix (90% ``GET
  /api/session``, 10% ``POST /api/incr``) and a write-heavy one (the reverse), each
  request carrying one of 32 sessions' cookies, for small (~100 B) and, unless
  ``--quick``, large (~20 KB) sessions;
* **CPU a request costs** the configuration's own processes (gunicorn's, its router,
  its Redis; read from ``/proc``), which moves less from run to run than req/s, and
  says where the ratios come from on a machine whose cores are all busy;
* **consistency**: simulated users, each with its own cookie, increment a counter in
  turns and check every answer against what they expect (the fraction that matched);
* **lost updates**: parallel requests of one session, setting different keys and
  incrementing one;
* **node loss**: ``kill -9`` of one node (or worker) while users go on: sessions lost,
  requests failed, time until all answer again;
* **scale-out**: a fifth node joins while users go on (4 -> 5): sessions lost;
* **churn through a registry** (``sticky (registry)``): under load from 30 users at
  once, a fifth node starts and registers itself, then an old one gets ``SIGTERM`` and
  leaves; requests failed and sessions lost in each phase.

Load comes from wrk (Debian's package) when it is installed, else from a small asyncio
generator (:mod:`benchmarks.rig.loadgen`; lower figures, same ratios). The peers
(Flask-Session 0.8, Flask's signed cookies) need the ``bench`` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from statescale.embedded import EmbeddedRedis
from statescale.processes import free_port, stop_process
from statescale.routing.backends import Backend
from statescale.routing.balancers import get as get_balancer

from .rig.delay import DelayProxy
from .rig.harness import (
    ADMIN_TOKEN,
    Gunicorn,
    Load,
    SessionClient,
    add_sticky_node,
    interleaved_increments,
    registered_node,
    spent,
    start_balancer,
    start_router,
    sticky_nodes,
    stop_together,
    usage,
    wait_serving,
)
from .rig.loadgen import GENERATORS, generator, run_load

#: statescale on the peers' routes (the demo's answers carry more).
STATESCALE_APP = "benchmarks.rig.peer_apps:statescale_app"
REMOTE_DELAY = 0.0005  # seconds each way: a Redis about 1 ms away
#: (label, share of writes): the two mixes every configuration is measured with
MIXES = (("read-heavy", 0.1), ("write-heavy", 0.9))
PERCENTILES = ("p50", "p90", "p99")
#: Every configuration, in the tables' order (what ``--only`` takes).
CONFIGURATIONS = (
    "ceiling",
    "shared",
    "affinity (gunicorn)",
    "affinity (workers route)",
    "shared+locking",
    "shared (Redis 1 ms away)",
    "sticky (gunicorn)",
    "sticky (workers route)",
    "sticky (router)",
    "sticky (registry)",
    "sticky (nginx)",
    "memory (no sticky)",
    "flask-session 0.8",
    "signed cookies",
)


@dataclass
class Setup:
    """One configuration, running: where it listens and what it is."""

    name: str
    port: int
    consistent_expected: bool
    note: str = ""
    results: dict[str, list[float]] = field(default_factory=dict)
    kill_one: Callable[[], None] | None = None  # kill -9 one node (or worker), for node loss
    # Adds a node; the ports to spread requests over after it (a balancer's job).
    add_one: Callable[[], list[int]] | None = None
    no_scale_out: str = "n/a"  # what the table says where add_one is None
    # Through a registry: a node that starts and registers, and one that leaves (SIGTERM).
    join: Callable[[], None] | None = None
    leave: Callable[[], None] | None = None
    #: The processes that serve it (gunicorn's, its Redis): what its CPU per request
    #: counts. None where not counted (the balanced fleets).
    pids: Callable[[], set[int]] | None = None


def _kill_worker(server: Gunicorn) -> Callable[[], None]:
    """kill -9 one worker of ``server`` (its master forks another)."""

    def kill() -> None:
        os.kill(min(server.worker_pids()), signal.SIGKILL)

    return kill


def _kill_node(node: Gunicorn) -> Callable[[], None]:
    """kill -9 a whole node, master and workers: the machine is gone."""

    def kill() -> None:
        assert node.process is not None
        for pid in [*node.worker_pids(), node.process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.process.wait(10)

    return kill


def _stop_on_exit(stack: ExitStack, proc: subprocess.Popen[bytes]) -> None:
    stack.callback(stop_process, proc, 15)


def start_all(stack: ExitStack, only: set[str] | None, log: Callable[[str], None]) -> list[Setup]:
    """Start every configuration (those in ``only``, if given); say why any is skipped.
    Each Redis-backed one gets a Redis of its own: pub/sub channels are server-wide, and
    one configuration's changes must not reach another's workers."""
    setups: list[Setup] = []
    notes: dict[str, str] = {}
    made: list[EmbeddedRedis] = []  # each configuration's Redis, in the order made

    def redis() -> dict[str, str]:
        server = stack.enter_context(EmbeddedRedis())
        made.append(server)
        return {"STATESCALE_STORE": "redis", "STATESCALE_REDIS_URL": server.url}

    def remote_redis() -> dict[str, str]:
        """A Redis about 1 ms away (0.5 ms each way through a delaying proxy): what a
        round trip through it measures is logged, and noted under the table."""
        server = stack.enter_context(EmbeddedRedis())
        made.append(server)
        proxy = stack.enter_context(DelayProxy(("127.0.0.1", server.port), REMOTE_DELAY))
        far = (
            f"a Redis PING round trip through the delaying proxy: {proxy.round_trip() * 1e3:.2f} ms"
        )
        notes["shared (Redis 1 ms away)"] = far
        log(far)
        url = f"redis://127.0.0.1:{proxy.port}/0"
        return {"STATESCALE_STORE": "redis", "STATESCALE_REDIS_URL": url}

    def want(name: str) -> bool:
        assert name in CONFIGURATIONS, name
        return only is None or name in only

    def gunicorn(
        name: str,
        env: Callable[[], dict[str, str]],
        consistent: bool,
        app: str = STATESCALE_APP,
        *,
        routed: bool = False,
    ) -> None:
        if not want(name):
            return
        log(f"starting {name}")
        first = len(made)
        environment = env()
        server = stack.enter_context(Gunicorn(env=environment, app=app))
        redis_pids = {s.process.pid for s in made[first:] if s.process is not None}

        def add_one() -> list[int]:
            """A second instance on the same store, behind a round-robin balancer."""
            other = stack.enter_context(Gunicorn(env=environment, app=app))
            return [server.port, other.port]

        setup = Setup(name, server.port, consistent, kill_one=_kill_worker(server))
        setup.pids = lambda: server.pids() | redis_pids
        if routed:  # the router inside the master routes over the slots it started with
            setup.no_scale_out = "n/a: slots fixed at start"
        elif consistent:
            setup.add_one = add_one
        setups.append(setup)

    # The ceiling: the same routes' /health in a Flask app with no session library.
    gunicorn("ceiling", redis, True, app="benchmarks.rig.peer_apps:plain_app")
    gunicorn("shared", redis, True)
    affinity = {"STATESCALE_MODE": "affinity"}
    gunicorn("affinity (gunicorn)", lambda: {**redis(), **affinity}, True, routed=True)
    by_workers = {**affinity, "STATESCALE_ROUTING": "workers"}  # no router process
    gunicorn("affinity (workers route)", lambda: {**redis(), **by_workers}, True, routed=True)
    gunicorn("shared+locking", lambda: {**redis(), "STATESCALE_LOCKING": "1"}, True)
    gunicorn("shared (Redis 1 ms away)", remote_redis, True)
    setups += _sticky_setups(stack, want, log)
    gunicorn("memory (no sticky)", lambda: {"STATESCALE_STORE": "memory"}, False)
    peers = importlib.util.find_spec("flask_session") is not None
    for name, app in (
        ("flask-session 0.8", "benchmarks.rig.peer_apps:flask_session_app"),
        ("signed cookies", "benchmarks.rig.peer_apps:signed_cookie_app"),
    ):
        if not want(name):
            continue
        if peers:
            gunicorn(name, redis, True, app=app)
        else:
            log(f"skipping {name}: install the bench extra (pip install -e '.[bench]')")
    for setup in setups:  # a balancer may still be starting
        SessionClient(setup.port).get("/health")
        setup.note = notes.get(setup.name, setup.note)
    return setups


def _sticky_setups(
    stack: ExitStack, want: Callable[[str], bool], log: Callable[[str], None]
) -> list[Setup]:
    """The sticky configurations: under gunicorn, behind the router, behind nginx."""
    setups: list[Setup] = []
    for name, routing in (("sticky (gunicorn)", "router"), ("sticky (workers route)", "workers")):
        if not want(name):
            continue
        log(f"starting {name}")
        env = {"STATESCALE_MODE": "sticky", "STATESCALE_ROUTING": routing}
        server = stack.enter_context(Gunicorn(env=env, app=STATESCALE_APP))
        setup = Setup(name, server.port, True, kill_one=_kill_worker(server))
        setup.pids = server.pids
        setup.no_scale_out = "n/a: slots fixed at start"
        setups.append(setup)
    if want("sticky (router)"):
        log("starting sticky (router)")
        nodes, backends = sticky_nodes(stack, balancer="statescale", app=STATESCALE_APP)
        port, admin = free_port(), free_port()
        _stop_on_exit(stack, start_router(backends, port, "--admin", f"127.0.0.1:{admin}"))
        setup = Setup("sticky (router)", port, True, kill_one=_kill_node(nodes[0]))
        setup.add_one = _router_add_node(stack, backends, port, admin)
        setups.append(setup)
    if want("sticky (registry)"):
        log("starting sticky (registry)")
        setups.append(_registry_setup(stack))
    if want("sticky (nginx)"):
        if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():
            log("starting sticky (nginx)")
            nodes, backends = sticky_nodes(stack, balancer="nginx", app=STATESCALE_APP)
            port, tmp = free_port(), Path(tempfile.mkdtemp(prefix="statescale-bench-nginx-"))
            nginx = start_balancer("nginx", backends, port, tmp)
            _stop_on_exit(stack, nginx)
            setup = Setup("sticky (nginx)", port, True, kill_one=_kill_node(nodes[0]))
            setup.add_one = _nginx_add_node(stack, backends, port, tmp, nginx)
            setups.append(setup)
        else:
            log("skipping sticky (nginx): nginx is not installed (apt-get install nginx-light)")
    return setups


def _registry_setup(stack: ExitStack) -> Setup:
    """Four nodes that register themselves in a Redis registry, behind `statescale
    router --registry`: a fifth joins by starting, an old one leaves by SIGTERM."""
    server = stack.enter_context(EmbeddedRedis())
    registry = f"{server.url}?prefix=bench"
    nodes = [registered_node(stack, registry, f"node{i}", app=STATESCALE_APP) for i in range(1, 5)]
    port = free_port()
    router = start_router([], port, "--registry", registry)
    _stop_on_exit(stack, router)
    wait_serving(port, router)
    setup = Setup("sticky (registry)", port, True, kill_one=_kill_node(nodes[-1]))
    setup.no_scale_out = "see churn"

    def join() -> None:
        registered_node(stack, registry, "node5", app=STATESCALE_APP)  # once it serves

    setup.join, setup.leave = join, nodes[0].stop
    return setup


def _router_add_node(
    stack: ExitStack, backends: list[Backend], port: int, admin: int
) -> Callable[[], list[int]]:
    """Start a fifth node and tell the router (``POST /nodes``) while it runs."""

    def add_one() -> list[int]:
        _, backend = add_sticky_node(stack, backends, balancer="statescale", app=STATESCALE_APP)
        reply = SessionClient(admin).post(
            f"/nodes?name={backend.name}&addr={backend.address}",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        if reply.status != 200:
            raise RuntimeError(f"the router refused the new node: HTTP {reply.status}")
        return [port]

    return add_one


def _nginx_add_node(
    stack: ExitStack,
    backends: list[Backend],
    port: int,
    folder: Path,
    nginx: subprocess.Popen[bytes],
) -> Callable[[], list[int]]:
    """Start a fifth node, rewrite nginx's configuration with it and reload (SIGHUP)."""

    def add_one() -> list[int]:
        _, backend = add_sticky_node(stack, backends, balancer="nginx", app=STATESCALE_APP)
        balancer = get_balancer("nginx")
        listen = f"127.0.0.1:{port}"
        conf = balancer.config([*backends, backend], listen=listen, cookie="statescale")
        (folder / balancer.config_name).write_text(conf)
        nginx.send_signal(signal.SIGHUP)
        time.sleep(1.0)  # the old workers finish; new ones start with the new ring
        return [port]

    return add_one


def _sessions(port: int, count: int, size: int) -> list[str]:
    """``count`` sessions of about ``size`` bytes each; their cookies. Values are random
    text: a signed cookie compresses what it carries, and ``'x' * 1000`` is 13 bytes
    then. None if the configuration cannot hold such a session (a cookie past
    gunicorn's 8 KB header limit)."""
    cookies = []
    for _ in range(count):
        client = SessionClient(port)
        for piece in range(max(1, size // 1000)):  # a request line stays under 4 KB
            value = secrets.token_urlsafe(min(size, 1000))[: min(size, 1000)]
            if client.post(f"/api/set?key=blob{piece}&value={value}").status != 200:
                return []
        if not client.cookie:
            return []
        cookies.append(client.cookie)
    return cookies


def measure(
    setups: list[Setup],
    *,
    duration: float,
    rounds: int,
    sizes: list[int],
    users: int,
    turns: int,
    tool: str,
    log: Callable[[str], None],
    warm: bool = True,
) -> None:
    cookies = {(s.name, size): _sessions(s.port, 32, size) for s in setups for size in sizes}
    seconds = max(1, round(duration)) if generator(tool) == "wrk" else 0  # wrk's whole seconds
    for (name, size), held in cookies.items():
        if not held and name != "ceiling":
            log(f"{name} cannot hold {size} B sessions: not measured at that size")
    if warm:
        log("warming up: one uncounted run each (a fresh server's first second runs slower)")
    for setup in setups if warm else []:
        route = ("GET", "/health") if setup.name == "ceiling" else None
        held = cookies[(setup.name, sizes[0])]
        if held or route:
            run_load(setup.port, held, writes=0.5, duration=1.0, route=route, tool=tool)
    for n in range(1, rounds + 1):
        # Each round starts one configuration further on: none is always measured
        # first, or always last, when the machine drifts within a round.
        turn = (n - 1) % len(setups)
        for size in sizes:
            for setup in setups[turn:] + setups[:turn]:
                if setup.name == "ceiling" and size != sizes[0]:
                    continue  # no session: once a round is the same work at every size
                if setup.name != "ceiling" and not cookies[(setup.name, size)]:
                    continue  # cannot hold sessions this size
                mixes: list[tuple[str, float, tuple[str, str] | None]] = (
                    [("health", 0.0, ("GET", "/health"))]
                    if setup.name == "ceiling"
                    else [(label, writes, None) for label, writes in MIXES]
                )
                if n % 2 == 0:  # nor is one mix always run right after the other
                    mixes.reverse()
                for label, writes, route in mixes:
                    pids = setup.pids() if setup.pids is not None else set()
                    before = usage(pids)
                    load = run_load(
                        setup.port,
                        cookies[(setup.name, size)],
                        writes=writes,
                        duration=duration,
                        route=route,
                        tool=tool,
                    )
                    key = f"{label}_{size}"
                    if pids:
                        cpu = spent(before, usage(pids))[0]
                        served = load.requests or load.rps * (seconds or duration)
                        setup.results.setdefault(f"{key}_cpu_us", []).append(cpu * 1e6 / served)
                    for metric, value in (
                        ("rps", load.rps),
                        ("client_cores", load.client_cores),
                        ("p50_ms", load.p50_ms),
                        ("p90_ms", load.p90_ms),
                        ("p99_ms", load.p99_ms),
                    ):
                        setup.results.setdefault(f"{key}_{metric}", []).append(value)
                    name = setup.name
                    log(
                        f"round {n}/{rounds} {size:>5} B  {name:<24} {label:<11} "
                        f"{load.rps:7.0f} req/s"
                    )
    for setup in setups:
        if setup.name == "ceiling":
            continue
        lost_updates(setup, parallel=16)
        r = setup.results
        log(
            f"lost updates {setup.name:<18} different keys {r['lost_different_keys'][0]:.0%}, "
            f"one key {r['lost_one_key'][0]:.0%}"
        )
        seen = interleaved_increments(setup.port, users=users, rounds=turns, key="turns")
        total = users * turns
        setup.results["consistency"] = [1 - len(seen.wrong) / total]
        log(f"consistency {setup.name:<18} {total - len(seen.wrong)}/{total}")
    for setup in setups:
        if setup.add_one is None or setup.name == "ceiling":
            continue
        scale_out(setup, users=20)
        r = setup.results
        log(
            f"scale-out {setup.name:<18} sessions lost {r['scale_out_sessions_lost'][0]:.0%}, "
            f"requests failed {r['scale_out_requests_failed'][0]:.0f}"
        )
    for setup in setups:
        if setup.join is None:
            continue
        churn(setup, users=30)
        r = setup.results
        log(
            f"churn {setup.name:<18} node joins: failed {r['churn_out_failed'][0]:.0f}, "
            f"sessions lost {r['churn_out_lost'][0]:.0%}; node leaves: failed "
            f"{r['churn_in_failed'][0]:.0f}, sessions lost {r['churn_in_lost'][0]:.0%} "
            f"({r['churn_requests'][0]:.0f} requests)"
        )
    for setup in setups:  # last: it kills things
        if setup.kill_one is None or setup.name in ("ceiling", "memory (no sticky)"):
            continue
        node_loss(setup, users=20)
        r = setup.results
        log(
            f"node loss {setup.name:<18} sessions lost {r['node_loss_sessions_lost'][0]:.0%}, "
            f"requests failed {r['node_loss_requests_failed'][0]:.0f}"
        )


def lost_updates(setup: Setup, parallel: int) -> None:
    """Parallel requests of one session: different keys set, and one key incremented.
    The client keeps the cookie of the last answer to arrive, as a browser would."""
    base = SessionClient(setup.port)
    base.post("/api/set?key=start&value=1")
    start = dict(base.cookies)

    def one(path: str) -> dict[str, str]:
        client = SessionClient(setup.port)
        client.cookies = dict(start)
        client.post(path)
        return client.cookies

    for label, paths in (
        ("different_keys", [f"/api/set?key=k{i}&value={i}" for i in range(parallel)]),
        ("one_key", ["/api/incr?key=n"] * parallel),
    ):
        with ThreadPoolExecutor(parallel) as pool:
            jars = list(pool.map(one, paths))
        reader = SessionClient(setup.port)
        reader.cookies = jars[-1]
        reply = reader.get("/api/session")
        data = reply.json.get("data", {}) if reply.status == 200 else {}
        if label == "different_keys":
            kept = sum(f"k{i}" in data for i in range(parallel))
        else:
            kept = data.get("n", 0) if isinstance(data.get("n", 0), int) else 0
        setup.results[f"lost_{label}"] = [(parallel - kept) / parallel]


def node_loss(setup: Setup, users: int) -> None:
    """Users with sessions; kill -9 one node; the same users go on. Sessions lost
    (a counter that starts again), requests failed, seconds until all answer again."""
    assert setup.kill_one is not None
    clients = [SessionClient(setup.port) for _ in range(users)]
    for _ in range(3):
        for client in clients:
            client.post("/api/incr?key=loss")
    setup.kill_one()
    killed = time.monotonic()
    failed = lost = 0
    recovered = None
    pending = set(range(users))
    for _ in range(3):
        for n, client in enumerate(clients):
            value = _incr(client, "loss")
            if value is None:
                failed += 1
                continue
            if n in pending:  # this user's first answer since the kill
                pending.discard(n)
                if not pending:
                    recovered = time.monotonic() - killed
            if value == 1:
                lost += 1
    setup.results["node_loss_sessions_lost"] = [lost / users]
    setup.results["node_loss_requests_failed"] = [float(failed)]
    setup.results["node_loss_recovery_s"] = [recovered if recovered is not None else -1.0]


def _incr(client: SessionClient, key: str) -> int | None:
    """``POST /api/incr?key=``: the new value, or None when the request failed."""
    try:
        reply = client.post(f"/api/incr?key={key}")
    except (OSError, http.client.HTTPException):  # a node killed mid-reply
        return None
    return int(reply.json["value"]) if reply.status == 200 else None


def scale_out(setup: Setup, users: int) -> None:
    """Users with sessions; a node joins; the same users go on, their requests spread over
    every node a balancer would now use. Sessions lost (a counter that did not carry on)
    and requests failed."""
    assert setup.add_one is not None
    clients = [SessionClient(setup.port) for _ in range(users)]
    for _ in range(3):
        for client in clients:
            client.post("/api/incr?key=grow")
    ports = setup.add_one()
    expected = [4] * users
    lost: set[int] = set()
    failed = 0
    for turn in range(3):
        for n, client in enumerate(clients):
            client.port = ports[(n + turn) % len(ports)]
            value = _incr(client, "grow")
            if value is None:
                failed += 1
                continue
            if value != expected[n]:
                lost.add(n)
            expected[n] = value + 1
    setup.results["scale_out_sessions_lost"] = [len(lost) / users]
    setup.results["scale_out_requests_failed"] = [float(failed)]


def churn(setup: Setup, users: int) -> None:
    """``users`` at once, looping increments; a node joins, then one leaves. Requests
    failed and sessions lost (a counter that did not carry on) in each phase."""
    assert setup.join is not None and setup.leave is not None
    seen: list[tuple[int, int]] = []  # (failures, users with a lost session) so far

    def mark(load: Load) -> None:
        seen.append((len(load.failures), len({user for user, _, _ in load.wrong()})))

    with Load(setup.port, users=users, key="churn") as load:
        time.sleep(1.0)
        mark(load)
        setup.join()
        time.sleep(2.0)  # the routers and nodes follow; sessions move to the new node
        mark(load)
        setup.leave()  # returns once the node has drained, handed over and stopped
        time.sleep(1.0)
    mark(load)
    (f0, l0), (f1, l1), (f2, l2) = seen
    setup.results["churn_out_failed"] = [float(f1 - f0)]
    setup.results["churn_out_lost"] = [(l1 - l0) / users]
    setup.results["churn_in_failed"] = [float(f2 - f1)]
    setup.results["churn_in_lost"] = [(l2 - l1) / users]
    setup.results["churn_requests"] = [float(load.requests)]


def report(setups: list[Setup], sizes: list[int]) -> tuple[str, dict[str, Any]]:
    """A Markdown table and the JSON figures."""
    ceiling = next((s for s in setups if s.name == "ceiling"), None)
    # No session: the same work whatever the size, measured once a round.
    one = statistics.median(ceiling.results[f"health_{sizes[0]}_rps"]) if ceiling else None
    base = {size: one for size in sizes} if one else {}

    def median(setup: Setup, key: str) -> float:
        return statistics.median(setup.results[key])

    def latency(setup: Setup, key: str) -> str:
        return f"{median(setup, f'{key}_p50_ms'):.1f}/{median(setup, f'{key}_p99_ms'):.1f}"

    mixes = " | ".join(f"{label} req/s (x ceiling) | {label} p50/p99 ms" for label, _ in MIXES)
    lines = [
        f"| configuration | session | {mixes} | consistency |",
        "|---|---|" + "---|---|" * len(MIXES) + "---|",
    ]
    data: dict[str, Any] = {}
    for setup in setups:
        data[setup.name] = {
            k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
            for k, v in setup.results.items()
        }
        for size in sizes:
            if setup.name == "ceiling":
                if size == sizes[0]:
                    cells = f"{base[size]:.0f} (1.00) | {latency(setup, f'health_{size}')}"
                    lines.append(f"| ceiling (/health) | no session | {cells} |" + " |" * 3)
                continue
            if f"{MIXES[0][0]}_{size}_rps" not in setup.results:
                cells = " | ".join(["cannot hold it", "n/a"] * len(MIXES))
                lines.append(f"| {setup.name} | {size} B | {cells} | n/a |")
                continue
            cells_list = []
            for label, _ in MIXES:
                rps = setup.results[f"{label}_{size}_rps"]
                ratio = f" ({statistics.median(rps) / base[size]:.2f})" if base else ""
                cells_list.append(
                    f"{statistics.median(rps):.0f} [{min(rps):.0f}-{max(rps):.0f}]{ratio}"
                )
                cells_list.append(latency(setup, f"{label}_{size}"))
            consistency = setup.results["consistency"][0]
            lines.append(
                f"| {setup.name} | {size} B | {' | '.join(cells_list)} | {consistency:.1%} |"
            )
    lines += ["", *(f"- {s.name}: {s.note}" for s in setups if s.note)]
    lines += [_generator_share(setups)]
    lines += _costs(setups, sizes)
    lines += [
        "",
        "| configuration | parallel writes of different keys lost | parallel increments lost | "
        "kill -9 (one worker under gunicorn; one node of 5, after the scale-out, behind a "
        "balancer): sessions lost | requests failed | the last user answered again after | "
        "an instance added (a second gunicorn, or a fifth node): sessions lost "
        "| requests failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setup in setups:
        r = setup.results
        if "lost_one_key" not in r:
            continue
        loss = (
            f"{r['node_loss_sessions_lost'][0]:.0%} | {r['node_loss_requests_failed'][0]:.0f} | "
            f"{r['node_loss_recovery_s'][0]:.2f} s"
            if "node_loss_sessions_lost" in r
            else "n/a | n/a | n/a"
        )
        grow = (
            f"{r['scale_out_sessions_lost'][0]:.0%} | {r['scale_out_requests_failed'][0]:.0f}"
            if "scale_out_sessions_lost" in r
            else f"{setup.no_scale_out} | n/a"
        )
        lines.append(
            f"| {setup.name} | {r['lost_different_keys'][0]:.0%} | {r['lost_one_key'][0]:.0%} "
            f"| {loss} | {grow} |"
        )
    churned = [s for s in setups if "churn_requests" in s.results]
    if churned:
        lines += [
            "",
            "| through a registry, 30 users at once | a node starts and joins: requests failed "
            "| sessions lost | an old node leaves (SIGTERM): requests failed | sessions lost "
            "| requests in all |",
            "|---|---|---|---|---|---|",
        ]
    for setup in churned:
        r = setup.results
        lines.append(
            f"| {setup.name} | {r['churn_out_failed'][0]:.0f} | {r['churn_out_lost'][0]:.0%} "
            f"| {r['churn_in_failed'][0]:.0f} | {r['churn_in_lost'][0]:.0%} "
            f"| {r['churn_requests'][0]:.0f} |"
        )
    return "\n".join(lines), data


def _costs(setups: list[Setup], sizes: list[int]) -> list[str]:
    """A table of what a request cost the machine in each configuration: CPU
    microseconds of its processes (gunicorn's master and workers, its router, its Redis;
    not the load generator), the medians of the runs. Steadier than req/s from one run
    to the next, and what the ratios come from on a machine whose cores are all busy."""
    counted = [s for s in setups if any(k.endswith("_cpu_us") for k in s.results)]
    if not counted:
        return []
    heads = " | ".join(f"{label} µs" for label, _ in MIXES)
    lines = [
        "",
        f"| CPU a request costs its server's processes and its Redis | session | {heads} |",
        "|---|---|" + "---|" * len(MIXES),
    ]
    for setup in counted:
        for size in sizes:
            if setup.name == "ceiling":
                values = setup.results.get(f"health_{size}_cpu_us")
                if values:
                    cells = " | ".join([f"{statistics.median(values):.0f} (/health)"] * len(MIXES))
                    lines.append(f"| ceiling | no session | {cells} |")
                continue
            found = [setup.results.get(f"{label}_{size}_cpu_us") for label, _ in MIXES]
            if all(found):
                cells = " | ".join(f"{statistics.median(v or [0]):.0f}" for v in found)
                lines.append(f"| {setup.name} | {size} B | {cells} |")
    lines.append(
        "- the balanced fleets (router, registry, nginx) are not counted: their processes "
        "are many and come and go"
    )
    return lines


def _generator_share(setups: list[Setup]) -> str:
    """A line on what the load generator took of the machine, which every ratio shares."""
    cores = [c for s in setups for k, v in s.results.items() if k.endswith("_client_cores")
             for c in v]  # fmt: skip
    if not cores:
        return ""
    total = os.cpu_count() or 1
    return (
        f"- the load generator itself kept {statistics.median(cores):.2f} of the machine's "
        f"{total} cores busy (median of the runs; {min(cores):.2f} to {max(cores):.2f}): "
        "the same for every row, it pulls every ratio toward 1"
    )


def plot(data: dict[str, Any], sizes: list[int], folder: Path) -> list[str]:
    """throughput.png, latency.png and faults.png in ``folder`` (for the smallest session
    size); the names written, none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    size = sizes[0]
    names = [n for n in data if n != "ceiling"]
    xs = list(range(len(names)))

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, (label, writes) in enumerate(MIXES):
        values = [data[n][f"{label}_{size}_rps"]["median"] for n in names]
        ax.bar(
            [x + (i - 0.5) * 0.4 for x in xs],
            values,
            width=0.4,
            label=f"{label} ({writes:.0%} POST /api/incr)",
        )
    top = max(data[n][f"{label}_{size}_rps"]["median"] for n in names for label, _ in MIXES)
    if "ceiling" in data:
        ceiling = data["ceiling"][f"health_{size}_rps"]["median"]
        ax.axhline(ceiling, color="grey", ls="--", label="ceiling (/health)")
        top = max(top, ceiling)
    ax.set_ylim(0, top * 1.3)  # room above the tallest bar and the ceiling for the legend
    ax.set_xticks(xs, names, rotation=20, ha="right")
    ax.set_ylabel("requests per second (median)")
    ax.set_title(f"benchmarks.compare: gunicorn -w 4, {size} B sessions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "throughput.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(MIXES), figsize=(12, 4.5), sharey=True)
    for ax, (label, _) in zip(axes, MIXES, strict=True):
        for i, pct in enumerate(PERCENTILES):
            values = [data[n][f"{label}_{size}_{pct}_ms"]["median"] for n in names]
            ax.bar([x + (i - 1) * 0.27 for x in xs], values, width=0.27, label=pct)
        ax.set_xticks(xs, names, rotation=30, ha="right")
        ax.set_title(f"{label} mix, {size} B sessions")
    axes[0].set_ylabel("latency, ms (median of runs)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(folder / "latency.png", dpi=110)
    plt.close(fig)

    faults = [n for n in names if "lost_one_key" in data[n]]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    fx = list(range(len(faults)))
    series = (
        ("lost_different_keys", "parallel writes of different keys lost"),
        ("lost_one_key", "parallel increments lost"),
        ("node_loss_sessions_lost", "sessions lost when a worker (or node) is killed"),
        ("scale_out_sessions_lost", "sessions lost when an instance is added"),
    )
    for i, (key, label) in enumerate(series):
        shown = [(x, 100 * data[n][key]["median"]) for x, n in enumerate(faults) if key in data[n]]
        xs_shown = [x + (i - 1.5) * 0.2 for x, _ in shown]
        ax.bar(xs_shown, [v for _, v in shown], width=0.2, label=label)
        for x, n in zip(fx, faults, strict=True):
            if key not in data[n]:  # not measured there: no bar, and a word
                ax.text(x + (i - 1.5) * 0.2, 0.5, "n/a", rotation=90, ha="center", fontsize=7)
    ax.set_xticks(fx, faults, rotation=20, ha="right")
    ax.set_ylabel("% lost")
    ax.set_title("benchmarks.compare: what each configuration loses")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "faults.png", dpi=110)
    plt.close(fig)
    return ["throughput.png", "latency.png", "faults.png"]


def run(
    *,
    quick: bool,
    duration: float | None,
    only: set[str] | None,
    out: Path,
    tool: str = "auto",
    rounds: int | None = None,
    sizes: list[int] | None = None,
) -> int:
    duration = duration or (1.0 if quick else 2.0)
    rounds = rounds or (1 if quick else 3)
    sizes = sizes or ([100] if quick else [100, 20_000])
    users, turns = (10, 5) if quick else (40, 20)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:5.1f}s] {message}", flush=True)

    tool = generator(tool)
    if tool == "wrk":
        log("load generator: wrk")
    else:
        log(
            "load generator: statescale's asyncio client (wrk is not installed: apt-get "
            "install wrk). Its figures are lower, and it favours the configurations behind a "
            "balancer, which keep its connections open where gunicorn closes them"
        )
    with ExitStack() as stack:
        setups = start_all(stack, only, log)
        measure(
            setups,
            duration=duration,
            rounds=rounds,
            sizes=sizes,
            users=users,
            turns=turns,
            tool=tool,
            log=log,
            warm=not quick,  # (--quick checks the rig, not the figures)
        )
        log("done; stopping everything")
        stop_together()
    log("stopped")
    table, data = report(setups, sizes)
    data["_run"] = {
        "load_generator": tool,
        "duration_s": duration,
        "rounds": rounds,
        "warm_up": not quick,
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
    }
    (out / "bench.md").write_text(table + "\n")
    (out / "bench.json").write_text(json.dumps(data, indent=2) + "\n")
    plots = plot({k: v for k, v in data.items() if not k.startswith("_")}, sizes, out)
    print()
    print(table)
    print(
        f"\nwrote {out / 'bench.md'}, {out / 'bench.json'}"
        + (f", {', '.join(plots)}" if plots else " (no plots: install the bench extra)")
    )
    broken = [
        s.name for s in setups if s.consistent_expected and s.results.get("consistency", [1])[0] < 1
    ]
    if broken:
        print(f"inconsistent where it must not be: {', '.join(broken)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="Start every configuration at once (shared, affinity under gunicorn, "
        "shared+locking, shared with Redis 1 ms away, sticky under gunicorn, sticky behind "
        "the router and behind nginx, "
        "memory without stickiness, the session-less ceiling, Flask-Session 0.8 and signed "
        "cookies), alternate load runs between them (a read-heavy and a write-heavy mix), "
        "check consistency with simulated users, lost updates, a node killed and a node "
        "added, and write bench.md, bench.json, throughput.png, latency.png and faults.png. "
        "About 5 minutes; --quick under a minute.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="one short round, no warm-up, small sessions"
    )
    parser.add_argument("--duration", type=float, help="seconds per load run (default 2, quick 1)")
    parser.add_argument(
        "--loadgen",
        choices=GENERATORS,
        default="auto",
        help="load generator: wrk when installed, else an asyncio client (default auto)",
    )
    parser.add_argument(
        "--rounds", type=int, help="alternating rounds of load runs (default 3, quick 1)"
    )
    parser.add_argument(
        "--sizes",
        help="comma-separated session sizes in bytes (default 100,20000; quick 100)",
    )
    parser.add_argument(
        "--only",
        help="comma-separated configuration names, of: " + ", ".join(CONFIGURATIONS),
    )
    parser.add_argument("--out", default="bench-results", help="directory for the results")
    args = parser.parse_args(argv)
    if args.loadgen == "wrk" and shutil.which("wrk") is None:
        print("benchmarks.compare: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    only = {name.strip() for name in args.only.split(",")} if args.only else None
    unknown = sorted((only or set()) - set(CONFIGURATIONS))
    if unknown:
        parser.error(
            f"--only: no configuration named {', '.join(map(repr, unknown))}; "
            f"the configurations are {', '.join(CONFIGURATIONS)}"
        )
    try:
        sizes = [int(size) for size in args.sizes.split(",")] if args.sizes else None
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: give sizes in bytes, comma-separated")
    if (args.rounds is not None and args.rounds < 1) or any(n < 1 for n in sizes or []):
        parser.error("--rounds and --sizes must be at least 1")
    return run(
        quick=args.quick,
        duration=args.duration,
        only=only,
        out=Path(args.out),
        tool=args.loadgen,
        rounds=args.rounds,
        sizes=sizes,
    )


if __name__ == "__main__":
    sys.exit(main())
