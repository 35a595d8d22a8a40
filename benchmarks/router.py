"""The built-in router's throughput beside nginx's, on the same four backends.

    python -m benchmarks.router [--duration 5] [--rounds 3] [--connections 32]

Four gunicorn nodes (sticky mode, memory store, one worker each) serve demo_app. In
front of them, alternated round by round in one run: nginx with `statescale lb-config`'s
file, `statescale router` on uvloop, and `statescale router` on asyncio's own loop.
wrk sends GET /api/session with one of 64 session cookies per request (each balancer
hashes it onto its own ring), so every node gets its share. The cookies are not
signed: a node finds no session and answers at once, so what differs between the rows
is the balancer alone. Each round starts one balancer further on, after an uncounted
warm-up.
"""

from __future__ import annotations

import argparse
import base64
import random
import signal
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from benchmarks.rig.harness import SessionClient, start_balancer, start_router, sticky_nodes
from benchmarks.rig.loadgen import READ, run_load
from statescale.processes import free_port


def session_ids(count: int) -> list[str]:
    """Cookie values each balancer hashes onto its ring (the ID before the '.')."""
    rng = random.Random(1)
    return [
        base64.urlsafe_b64encode(rng.randbytes(32)).rstrip(b"=").decode() + ".x"
        for _ in range(count)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="statescale-router-bench-"))
    cookies = session_ids(64)
    with ExitStack() as stack:
        _, backends = sticky_nodes(stack)  # wrk's cookies are random: any ring will do
        ports = {
            "nginx": free_port(),
            "router (uvloop)": free_port(),
            "router (asyncio)": free_port(),
        }
        procs = [
            start_balancer("nginx", backends, ports["nginx"], tmp),
            start_router(backends, ports["router (uvloop)"]),
            start_router(backends, ports["router (asyncio)"], "--no-uvloop"),
        ]
        for proc in procs:
            stack.callback(proc.wait, 10)
            stack.callback(proc.send_signal, signal.SIGTERM)  # callbacks run last-in first
        for port in ports.values():
            SessionClient(port).get("/health")
        order = list(ports)
        for port in ports.values():  # warm-up, uncounted: a fresh server starts slower
            run_load(port, cookies, writes=0.0, duration=1.0, route=READ)
        results: dict[str, list[float]] = {name: [] for name in ports}
        for n in range(1, args.rounds + 1):
            turn = (n - 1) % len(order)  # each round one further on: no fixed place
            for name in order[turn:] + order[:turn]:
                port = ports[name]
                rps = run_load(
                    port,
                    cookies,
                    writes=0.0,
                    duration=args.duration,
                    connections=args.connections,
                    route=READ,
                ).rps
                results[name].append(rps)
                print(f"  round {n}/{args.rounds}  {name:<17} {rps:8.0f} req/s", flush=True)
    base = statistics.median(results["nginx"])
    print("\n| balancer | req/s median | min-max | ratio to nginx |\n|---|---|---|---|")
    for name, values in results.items():
        median = statistics.median(values)
        print(
            f"| {name} | {median:.0f} | {min(values):.0f}-{max(values):.0f} | {median / base:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
