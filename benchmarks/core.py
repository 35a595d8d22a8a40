"""Requests per second of the session routes beside the session-less ceiling.

    python -m benchmarks.core [--mode shared|affinity] [--routing router|workers]
                              [--sessions 64] [--duration 5] [--rounds 3] [--connections 16]

gunicorn -w 4 serves demo_app in shared or affinity mode (Redis store; an embedded
redis-server unless STATESCALE_REDIS_URL is set; affinity puts the router inside the
master in front, or with ``--routing workers`` has the workers route among themselves).
wrk drives, each request carrying one of ``--sessions`` cookies:

* GET /health         the same server and path with no session work: the ceiling
* GET /api/session    load the session (no round trip once a worker holds a copy)
* POST /api/incr      load + save (the save's one round trip; in shared mode the
                      other workers' copies of that session go, so their next load
                      reads Redis)

The three alternate round by round in one run (this machine is noisy), each round
starting one route further on, and the table gives each route's median with min-max and
its ratio to the ceiling's median, and what each request cost the server's processes
(the master, its workers, its router and its Redis; not wrk), from ``/proc``: CPU
microseconds and context switches. A round trip to
Redis shows as two or three switches more: the worker sleeps until Redis answers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from benchmarks.rig.harness import Gunicorn, SessionClient, spent, usage
from benchmarks.rig.loadgen import run_load

#: What each route's runs record: req/s, and per request CPU µs and context switches.
COSTS = ("cpu_us", "switches")

ROUTES = [
    ("GET /health (ceiling)", "GET", "/health"),
    ("GET /api/session", "GET", "/api/session"),
    ("POST /api/incr", "POST", "/api/incr?key=n"),
]


def wrk(
    port: int, method: str, path: str, cookies: list[str], duration: float, connections: int
) -> float:
    """Requests per second (a run with any failed request is an error)."""
    route = (method, path)
    return run_load(
        port,
        cookies,
        writes=0.0,
        duration=duration,
        connections=connections,
        route=route,
        tool="wrk",  # whole seconds: the costs divide by them
    ).rps


def run(
    mode: str, sessions: int, duration: float, rounds: int, connections: int, routing: str
) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {name: [] for name, _, _ in ROUTES}
    results.update({f"{name} {cost}": [] for name, _, _ in ROUTES for cost in COSTS})
    env = {"STATESCALE_STORE": "redis", "STATESCALE_MODE": mode, "STATESCALE_ROUTING": routing}
    with Gunicorn(env=env, workers=4) as server:
        cookies = []
        for _ in range(sessions):
            client = SessionClient(server.port)
            client.post("/api/set?key=user&value=" + "x" * 64)  # a ~100 B session
            client.get("/api/session")  # its return: the first lifetime slides
            assert client.cookie is not None
            cookies.append(client.cookie)
        for n in range(1, rounds + 1):
            # Each round starts one route further on: on these VMs the same run measured
            # first or last in every round moved by a few percent on its place alone.
            turn = (n - 1) % len(ROUTES)
            for name, method, path in ROUTES[turn:] + ROUTES[:turn]:
                pids = server.pids()
                before = usage(pids)
                rps = wrk(server.port, method, path, cookies, duration, connections)
                cpu, switches = spent(before, usage(pids))
                requests = rps * max(1, round(duration))  # wrk runs whole seconds
                results[name].append(rps)
                results[f"{name} cpu_us"].append(cpu * 1e6 / requests)
                results[f"{name} switches"].append(switches / requests)
                print(f"  round {n}/{rounds}  {name:<24} {rps:9.0f} req/s", flush=True)
    return results


def table(results: dict[str, list[float]]) -> str:
    ceiling = statistics.median(results[ROUTES[0][0]])
    lines = [
        "| route | req/s median | min-max | ratio to ceiling "
        "| server CPU µs a request | context switches a request |",
        "|---|---|---|---|---|---|",
    ]
    for name, _, _ in ROUTES:
        values = results[name]
        median = statistics.median(values)
        cpu, switches = (statistics.median(results[f"{name} {cost}"]) for cost in COSTS)
        lines.append(
            f"| {name} | {median:.0f} | {min(values):.0f}-{max(values):.0f} "
            f"| {median / ceiling:.2f} | {cpu:.0f} | {switches:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds per wrk run (default 5)"
    )
    parser.add_argument("--mode", choices=["shared", "affinity"], default="shared")
    parser.add_argument(
        "--routing",
        choices=["router", "workers"],
        default="router",
        help="affinity: a router in the master (default), or the workers route",
    )
    parser.add_argument("--sessions", type=int, default=64, help="session cookies (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("benchmarks.core: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    routed_by = ", the workers routing" if args.routing == "workers" else ""
    print(
        f"gunicorn -w 4 demo_app:app, {args.mode} mode{routed_by}, {args.sessions} sessions; "
        f"wrk -c{args.connections}, {args.duration:g}s runs"
    )
    results = run(
        args.mode, args.sessions, args.duration, args.rounds, args.connections, args.routing
    )
    print()
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
