"""How far each session library is from the floor: ``python -m benchmarks.floor``.

A session costs a request its library's work and its store's round trips. The floors
are the same Flask routes with the round trips alone (:mod:`benchmarks.rig.peer_apps`:
a bare socket, hiredis, the cookie taken as the key unchecked, no script in Redis):
one a write, as an owner that serves reads from memory needs (affinity), or a read and
a write, as a store that keeps no copy needs (shared mode's writes here, where four
workers take turns at every session, so another worker wrote last; its reads are
mostly served by its copies, below the second floor). What a library costs above the
floor that matches it is what its own work costs.

Each configuration runs under ``gunicorn -w 4`` on its own embedded Redis, with 32
sessions of about 100 bytes; the read-heavy and write-heavy mixes of
:mod:`benchmarks.compare` alternate between them round by round (each round starting
one configuration further on), and each figure is the median of the rounds. CPU is
what a request cost the server's processes and its Redis, from ``/proc`` (not wrk's):
it moves less from run to run than req/s on a machine whose cores are all busy.

The table ends with the write bar the ownership issue set (the write-heavy mix at least
1.3 times Flask-Session's requests a second): the server CPU a request may cost to meet
it, beside what each floor costs. On a machine whose cores are all busy, requests a
second go as the inverse of all the CPU a request takes, wrk's share included, so the
budget is (Flask-Session's CPU + wrk's) / 1.3 - wrk's.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field

from statescale.embedded import EmbeddedRedis

from .compare import MIXES, _sessions
from .rig.harness import Gunicorn, spent, stop_together, usage
from .rig.loadgen import run_load

_APPS = "benchmarks.rig.peer_apps:"
#: (name, app, environment): the floors, statescale's two modes, the peers.
CONFIGURATIONS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("floor: 1 round trip a write", _APPS + "floor1_app", {}),
    ("floor: 2 round trips a write", _APPS + "floor2_app", {}),
    ("statescale shared", _APPS + "statescale_app", {}),
    (
        "statescale affinity (workers route)",
        _APPS + "statescale_app",
        {"STATESCALE_MODE": "affinity", "STATESCALE_ROUTING": "workers"},
    ),
    ("flask-session 0.8", _APPS + "flask_session_app", {}),
    ("signed cookies", _APPS + "signed_cookie_app", {}),
)
PEER, COOKIES = "flask-session 0.8", "signed cookies"
BAR = 1.3  # writes: at least this many times Flask-Session's


@dataclass
class Row:
    name: str
    server: Gunicorn
    redis: EmbeddedRedis
    cookies: list[str] = field(default_factory=list)
    rps: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # server and Redis, µs
    client: dict[str, list[float]] = field(default_factory=dict)  # wrk's, µs a request

    def median(self, what: str, mix: str) -> float:
        figures: dict[str, list[float]] = getattr(self, what)
        return statistics.median(figures[mix])


def _pid(redis: EmbeddedRedis) -> set[int]:
    return {redis.process.pid} if redis.process is not None else set()


def measure(rows: list[Row], rounds: int, duration: float) -> None:
    for row in rows:  # a fresh server's first second runs slower: not counted
        run_load(row.server.port, row.cookies, writes=0.5, duration=1, tool="wrk")
    for n in range(rounds):
        turn = n % len(rows)
        for row in rows[turn:] + rows[:turn]:
            mixes = MIXES if n % 2 == 0 else MIXES[::-1]
            for mix, writes in mixes:
                pids = row.server.pids() | _pid(row.redis)
                before = usage(pids)
                load = run_load(
                    row.server.port, row.cookies, writes=writes, duration=duration, tool="wrk"
                )
                cpu = spent(before, usage(pids))[0]
                row.rps.setdefault(mix, []).append(load.rps)
                row.cpu.setdefault(mix, []).append(cpu * 1e6 / max(1, load.requests))
                row.client.setdefault(mix, []).append(load.client_cores * 1e6 / load.rps)
            print(
                f"  round {n + 1}/{rounds}  {row.name:<36} "
                + ", ".join(f"{mix} {row.rps[mix][-1]:.0f} req/s" for mix, _ in MIXES),
                flush=True,
            )


def table(rows: list[Row]) -> str:
    by = {row.name: row for row in rows}
    peer, cookies = by[PEER], by[COOKIES]
    lines = [
        "| configuration | mix | req/s median (min-max) | server CPU µs a request "
        "| req/s ÷ Flask-Session's | its CPU ÷ this one's "
        "| req/s ÷ signed cookies' | their CPU ÷ this one's |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for mix, _ in MIXES:
            rps, cpu = row.median("rps", mix), row.median("cpu", mix)
            low, high = min(row.rps[mix]), max(row.rps[mix])
            ratios = " | ".join(
                f"{rps / other.median('rps', mix):.2f} | {other.median('cpu', mix) / cpu:.2f}"
                for other in (peer, cookies)
            )
            lines.append(
                f"| {row.name} | {mix} | {rps:.0f} ({low:.0f}-{high:.0f}) | {cpu:.0f} | {ratios} |"
            )
    mix = "write-heavy"
    client = statistics.median(v for row in rows for v in row.client[mix])
    allowed = (peer.median("cpu", mix) + client) / BAR - client
    floors = [row for row in rows if row.name.startswith("floor")]
    lines += [
        "",
        f"The {mix} mix at {BAR}x Flask-Session's req/s may cost {allowed:.0f} µs of server "
        f"CPU a request (wrk took {client:.0f} µs a request); "
        + "; ".join(
            f"{row.name} costs {row.median('cpu', mix):.0f}, which leaves a library "
            f"{allowed - row.median('cpu', mix):.0f} µs above it"
            for row in floors
        )
        + ".",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.floor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=len(CONFIGURATIONS),
        help=f"alternating rounds (default {len(CONFIGURATIONS)}: each configuration first once)",
    )
    parser.add_argument(
        "--duration", type=float, default=2.0, help="seconds per wrk run (default 2)"
    )
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("benchmarks.floor: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    with ExitStack() as stack:
        rows = []
        for name, app, extra in CONFIGURATIONS:
            print(f"starting {name}", flush=True)
            redis = stack.enter_context(EmbeddedRedis())
            env = {"STATESCALE_STORE": "redis", "STATESCALE_REDIS_URL": redis.url, **extra}
            server = stack.enter_context(Gunicorn(env=env, app=app))
            rows.append(Row(name, server, redis, _sessions(server.port, 32, 100)))
        measure(rows, args.rounds, args.duration)
        stop_together()
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
