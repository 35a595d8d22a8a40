"""``statescale bench``: every way to keep sessions across ``gunicorn -w 4``, side by side.

All configurations run at once on loopback (real gunicorn, real Redis, real balancers);
the measurements alternate between them round by round, because these machines are
noisy, and each figure is the median with its min-max.

* **throughput** and **p50/p99 latency** of a read (``GET /api/session``) and a write
  (``POST /api/incr``) with wrk, each request carrying one of 32 sessions' cookies,
  for small (~100 B) and, unless ``--quick``, large (~20 KB) sessions;
* **consistency**: simulated users, each with its own cookie, increment a counter in
  turns and check every answer against what they expect (the fraction that matched).

Needs wrk (Debian's package); nginx is used when installed; the peers (Flask-Session
0.8, Flask's signed cookies) when the ``bench`` extra is installed and
``benchmarks/`` is importable (run from the repository root).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
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

from ._delay import DelayProxy
from .embedded import EmbeddedRedis, free_port
from .harness import (
    ROOT,
    Gunicorn,
    SessionClient,
    interleaved_increments,
    start_balancer,
    start_router,
    sticky_nodes,
)

_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_LATENCY = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}
REMOTE_DELAY = 0.0005  # seconds each way: a Redis about 1 ms away


@dataclass
class Setup:
    """One configuration, running: where it listens and what it is."""

    name: str
    port: int
    consistent_expected: bool
    note: str = ""
    results: dict[str, list[float]] = field(default_factory=dict)
    kill_one: Callable[[], None] | None = None  # kill -9 one node (or worker), for node loss


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
    def stop() -> None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)

    stack.callback(stop)


def start_all(stack: ExitStack, only: set[str] | None, log: Callable[[str], None]) -> list[Setup]:
    """Start every configuration (those in ``only``, if given); say why any is skipped.
    Each Redis-backed one gets a Redis of its own: pub/sub channels are server-wide, and
    one configuration's changes must not reach another's workers."""
    setups: list[Setup] = []

    def redis() -> dict[str, str]:
        server = stack.enter_context(EmbeddedRedis())
        return {"STATESCALE_STORE": "redis", "STATESCALE_REDIS_URL": server.url}

    def remote_redis() -> dict[str, str]:
        """A Redis about 1 ms away (0.5 ms each way through a delaying proxy)."""
        server = stack.enter_context(EmbeddedRedis())
        proxy = stack.enter_context(DelayProxy(("127.0.0.1", server.port), REMOTE_DELAY))
        url = f"redis://127.0.0.1:{proxy.port}/0"
        return {"STATESCALE_STORE": "redis", "STATESCALE_REDIS_URL": url}

    def want(name: str) -> bool:
        return only is None or name in only

    def gunicorn(
        name: str, env: Callable[[], dict[str, str]], consistent: bool, app: str = "demo_app:app"
    ) -> None:
        if want(name):
            log(f"starting {name}")
            server = stack.enter_context(Gunicorn(env=env(), app=app))
            setups.append(Setup(name, server.port, consistent, kill_one=_kill_worker(server)))

    gunicorn("ceiling", redis, True)  # measured on /health only
    gunicorn("shared", redis, True)
    gunicorn("shared+locking", lambda: {**redis(), "STATESCALE_LOCKING": "1"}, True)
    gunicorn("shared (Redis 1 ms away)", remote_redis, True)
    gunicorn("sticky (gunicorn)", lambda: {"STATESCALE_MODE": "sticky"}, True)
    if want("sticky (router)"):
        log("starting sticky (router)")
        nodes, backends = sticky_nodes(stack, balancer="statescale")
        port = free_port()
        _stop_on_exit(stack, start_router(backends, port))
        setups.append(Setup("sticky (router)", port, True, kill_one=_kill_node(nodes[0])))
    if want("sticky (nginx)"):
        if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():
            log("starting sticky (nginx)")
            nodes, backends = sticky_nodes(stack, balancer="nginx")
            port, tmp = free_port(), Path(tempfile.mkdtemp(prefix="statescale-bench-nginx-"))
            _stop_on_exit(stack, start_balancer("nginx", backends, port, tmp))
            setups.append(Setup("sticky (nginx)", port, True, kill_one=_kill_node(nodes[0])))
        else:
            log("skipping sticky (nginx): nginx is not installed (apt-get install nginx-light)")
    gunicorn("memory (no sticky)", lambda: {"STATESCALE_STORE": "memory"}, False)
    peers = importlib.util.find_spec("flask_session") is not None and (ROOT / "benchmarks").is_dir()
    for name, app in (
        ("flask-session 0.8", "benchmarks.peer_apps:flask_session_app"),
        ("signed cookies", "benchmarks.peer_apps:signed_cookie_app"),
    ):
        if not want(name):
            continue
        if peers:
            gunicorn(name, redis, True, app=app)
        else:
            log(f"skipping {name}: install the bench extra and run from the repository root")
    for setup in setups:  # a balancer may still be starting
        SessionClient(setup.port).get("/health")
    return setups


def _sessions(port: int, count: int, size: int) -> list[str]:
    cookies = []
    for _ in range(count):
        client = SessionClient(port)
        for piece in range(max(1, size // 1000)):  # a request line stays under 4 KB
            client.post(f"/api/set?key=blob{piece}&value={'x' * min(size, 1000)}")
        if client.cookie:
            cookies.append(client.cookie)
    return cookies


def run_wrk(
    port: int,
    path: str,
    method: str,
    cookies: list[str],
    *,
    duration: float,
    connections: int = 16,
) -> tuple[float, float, float]:
    """wrk against 127.0.0.1:``port``, each request carrying one of ``cookies`` as the
    session cookie: (requests/s, p50 ms, p99 ms). A run with any non-2xx answer or
    socket error is an error, not a figure."""
    table = ", ".join(f'"{c}"' for c in cookies) or '""'
    script = (
        f'local cookies = {{{table}}}\nwrk.method = "{method}"\n'
        "request = function()\n  local c = cookies[math.random(#cookies)]\n"
        '  return wrk.format(nil, nil, {Cookie = "statescale=" .. c})\nend\n'
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script)
        lua.flush()
        command = [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{duration:g}s",
            "--latency",
            "-s",
            lua.name,
        ]
        out = subprocess.run(
            [*command, f"http://127.0.0.1:{port}{path}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=duration + 60,
        ).stdout
    if "Non-2xx" in out or re.search(r"Socket errors: connect [1-9]|read [1-9]|timeout [1-9]", out):
        raise RuntimeError(f"wrk saw failed requests on {path}:\n{out}")
    rps = _RPS.search(out)
    latency = {p: float(v) * _UNIT[u] for p, v, u in _LATENCY.findall(out)}
    if rps is None or set(latency) != {"50", "99"}:
        raise RuntimeError(f"could not read wrk's output:\n{out}")
    return float(rps.group(1)), latency["50"], latency["99"]


def measure(
    setups: list[Setup],
    *,
    duration: float,
    rounds: int,
    sizes: list[int],
    users: int,
    turns: int,
    log: Callable[[str], None],
) -> None:
    cookies = {(s.name, size): _sessions(s.port, 32, size) for s in setups for size in sizes}
    for n in range(1, rounds + 1):
        for size in sizes:
            for setup in setups:
                routes = (
                    [("health", "/health", "GET")]
                    if setup.name == "ceiling"
                    else [("read", "/api/session", "GET"), ("write", "/api/incr?key=n", "POST")]
                )
                for label, path, method in routes:
                    rps, p50, p99 = run_wrk(
                        setup.port, path, method, cookies[(setup.name, size)], duration=duration
                    )
                    key = f"{label}_{size}"
                    for metric, value in (("rps", rps), ("p50_ms", p50), ("p99_ms", p99)):
                        setup.results.setdefault(f"{key}_{metric}", []).append(value)
                    name = setup.name
                    log(f"round {n}/{rounds} {size:>5} B  {name:<18} {label:<6} {rps:7.0f} req/s")
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
            try:
                reply = client.post("/api/incr?key=loss")
            except OSError:
                failed += 1
                continue
            if reply.status != 200:
                failed += 1
                continue
            pending.discard(n)
            if reply.json["value"] == 1:
                lost += 1
        if not pending and recovered is None:
            recovered = time.monotonic() - killed
    setup.results["node_loss_sessions_lost"] = [lost / users]
    setup.results["node_loss_requests_failed"] = [float(failed)]
    setup.results["node_loss_recovery_s"] = [recovered if recovered is not None else -1.0]


def report(setups: list[Setup], sizes: list[int]) -> tuple[str, dict[str, Any]]:
    """A Markdown table and the JSON figures."""
    ceiling = next((s for s in setups if s.name == "ceiling"), None)
    base = (
        {size: statistics.median(ceiling.results[f"health_{size}_rps"]) for size in sizes}
        if ceiling
        else {}
    )
    lines = [
        "| configuration | session | read req/s (x ceiling) | read p50/p99 ms | "
        "write req/s (x ceiling) | write p50/p99 ms | consistency |",
        "|---|---|---|---|---|---|---|",
    ]
    data: dict[str, Any] = {}
    for setup in setups:
        data[setup.name] = {
            k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
            for k, v in setup.results.items()
        }
        if setup.name == "ceiling":
            for size in sizes:
                lines.append(
                    f"| ceiling (/health) | {size} B | {base[size]:.0f} (1.00) | "
                    f"{statistics.median(setup.results[f'health_{size}_p50_ms']):.1f}/"
                    f"{statistics.median(setup.results[f'health_{size}_p99_ms']):.1f} | | | |"
                )
            continue
        for size in sizes:
            cells = []
            for label in ("read", "write"):
                rps = setup.results[f"{label}_{size}_rps"]
                ratio = f" ({statistics.median(rps) / base[size]:.2f})" if base else ""
                cells.append(f"{statistics.median(rps):.0f} [{min(rps):.0f}-{max(rps):.0f}]{ratio}")
                cells.append(
                    f"{statistics.median(setup.results[f'{label}_{size}_p50_ms']):.1f}/"
                    f"{statistics.median(setup.results[f'{label}_{size}_p99_ms']):.1f}"
                )
            consistency = setup.results["consistency"][0]
            lines.append(f"| {setup.name} | {size} B | {' | '.join(cells)} | {consistency:.1%} |")
    lines += [
        "",
        "| configuration | parallel writes of different keys lost | parallel increments lost | "
        "kill -9 of a node: sessions lost | requests failed | all answering again after |",
        "|---|---|---|---|---|---|",
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
        lines.append(
            f"| {setup.name} | {r['lost_different_keys'][0]:.0%} | {r['lost_one_key'][0]:.0%} "
            f"| {loss} |"
        )
    return "\n".join(lines), data


def plot(data: dict[str, Any], sizes: list[int], path: Path) -> bool:
    """Throughput per configuration, read and write, for the smallest session size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    size = sizes[0]
    names = [n for n in data if n != "ceiling"]
    reads = [data[n][f"read_{size}_rps"]["median"] for n in names]
    writes = [data[n][f"write_{size}_rps"]["median"] for n in names]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], reads, width=0.4, label="read (GET /api/session)")
    ax.bar([x + 0.2 for x in xs], writes, width=0.4, label="write (POST /api/incr)")
    if "ceiling" in data:
        ax.axhline(
            data["ceiling"][f"health_{size}_rps"]["median"],
            color="grey",
            ls="--",
            label="ceiling (/health)",
        )
    ax.set_xticks(list(xs), names, rotation=20, ha="right")
    ax.set_ylabel("requests per second (median)")
    ax.set_title(f"statescale bench: gunicorn -w 4, {size} B sessions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    faults = [n for n in names if "lost_one_key" in data[n]]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = range(len(faults))
    series = (
        ("lost_different_keys", "parallel writes of different keys lost"),
        ("lost_one_key", "parallel increments lost"),
        ("node_loss_sessions_lost", "sessions lost when a node is killed"),
    )
    for i, (key, label) in enumerate(series):
        values = [100 * data[n].get(key, {"median": 0})["median"] for n in faults]
        ax.bar([x + (i - 1) * 0.27 for x in xs], values, width=0.27, label=label)
    ax.set_xticks(list(xs), faults, rotation=20, ha="right")
    ax.set_ylabel("% lost")
    ax.set_title("statescale bench: what each configuration loses")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_name("faults.png"), dpi=110)
    plt.close(fig)
    return True


def run(*, quick: bool, duration: float | None, only: set[str] | None, out: Path) -> int:
    if shutil.which("wrk") is None:
        print("statescale bench: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    duration = duration or (1.0 if quick else 2.0)
    rounds, sizes = (1, [100]) if quick else (3, [100, 20_000])
    users, turns = (10, 5) if quick else (40, 20)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:5.1f}s] {message}", flush=True)

    with ExitStack() as stack:
        setups = start_all(stack, only, log)
        measure(
            setups, duration=duration, rounds=rounds, sizes=sizes, users=users, turns=turns, log=log
        )
    table, data = report(setups, sizes)
    (out / "bench.md").write_text(table + "\n")
    (out / "bench.json").write_text(json.dumps(data, indent=2) + "\n")
    plotted = plot(data, sizes, out / "throughput.png")
    print()
    print(table)
    print(
        f"\nwrote {out / 'bench.md'}, {out / 'bench.json'}"
        + (", throughput.png, faults.png" if plotted else " (no plots: install the bench extra)")
    )
    broken = [
        s.name for s in setups if s.consistent_expected and s.results.get("consistency", [1])[0] < 1
    ]
    if broken:
        print(f"inconsistent where it must not be: {', '.join(broken)}", file=sys.stderr)
        return 1
    return 0
