"""The built-in router's throughput beside nginx's, on the same four backends.

    python -m benchmarks.router [--duration 5] [--rounds 3] [--connections 32]

Four gunicorn nodes (sticky mode, memory store, one worker each) serve demo_app. In
front of them, alternated round by round in one run: nginx with `statescale lb-config`'s
file, `statescale router` on uvloop, and `statescale router` on asyncio's own loop.
wrk sends GET /api/session with one of 64 session cookies per request (each balancer
hashes it onto its own ring), so every node gets its share.
"""

from __future__ import annotations

import argparse
import base64
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from statescale.bench import run_wrk
from statescale.embedded import free_port
from statescale.harness import Gunicorn, SessionClient
from statescale.routing.lb_config import Backend, nginx_config


def start_nginx(backends: list[Backend], port: int, tmp: Path) -> subprocess.Popen[bytes]:
    (tmp / "tmp").mkdir(exist_ok=True)
    (tmp / "nginx.conf").write_text(nginx_config(backends, listen=f"127.0.0.1:{port}"))
    return subprocess.Popen(
        ["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-g", "daemon off;"],
        stderr=subprocess.DEVNULL,
    )


def start_router(specs: list[str], port: int, *, uvloop: bool) -> subprocess.Popen[bytes]:
    args = [a for s in specs for a in ("--backend", s)]
    extra = [] if uvloop else ["--no-uvloop"]
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "statescale",
            "router",
            *args,
            "--listen",
            f"127.0.0.1:{port}",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


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
        nodes = [Gunicorn(workers=1) for _ in range(4)]
        backends = [Backend(f"node{i}", "127.0.0.1", g.port) for i, g in enumerate(nodes, 1)]
        specs = [f"{b.name}={b.address}" for b in backends]
        for b, g in zip(backends, nodes, strict=True):
            g.env.update(
                STATESCALE_MODE="sticky",
                STATESCALE_STORE="memory",
                STATESCALE_BACKENDS=",".join(specs),
                STATESCALE_NODE=b.name,
            )
            stack.enter_context(g)
        ports = {
            "nginx": free_port(),
            "router (uvloop)": free_port(),
            "router (asyncio)": free_port(),
        }
        procs = [
            start_nginx(backends, ports["nginx"], tmp),
            start_router(specs, ports["router (uvloop)"], uvloop=True),
            start_router(specs, ports["router (asyncio)"], uvloop=False),
        ]
        for proc in procs:
            stack.callback(proc.wait, 10)
            stack.callback(proc.send_signal, signal.SIGTERM)  # callbacks run last-in first
        for port in ports.values():
            SessionClient(port).get("/health")
        time.sleep(0.5)
        results: dict[str, list[float]] = {name: [] for name in ports}
        for n in range(1, args.rounds + 1):
            for name, port in ports.items():
                rps, _, _ = run_wrk(
                    port,
                    "/api/session",
                    "GET",
                    cookies,
                    duration=args.duration,
                    connections=args.connections,
                )
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
