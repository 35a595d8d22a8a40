"""``python -m benchmarks.demo``: the demo comparison, the project's main job.

It starts ``demo_app`` under ``gunicorn -w N`` in each mode, on an embedded
``redis-server`` the toolkit starts itself unless ``--redis-url`` is given, sends one
user's increments to each, and prints a table of what came back: consistent, or split
between workers.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from .rig.harness import Gunicorn, SessionClient


@dataclass
class DemoResult:
    mode: str
    values: list[int]
    pids: set[int]
    warning: str

    @property
    def matching(self) -> int:
        return sum(v == i for i, v in enumerate(self.values, 1))


def _demo_mode(mode: str, env: dict[str, str], workers: int, requests: int) -> DemoResult:
    """``requests`` increments by one user; more, up to ten times as many, until two
    workers have served (the kernel may hand a short run of connections to one)."""
    print(f"  {mode}: starting gunicorn -w {workers} demo_app:app ...", flush=True)
    with Gunicorn(env=env, workers=workers) as server:
        client = SessionClient(server.port)
        values: list[int] = []
        pids: set[int] = set()
        for i in range(requests * 10):
            if i >= requests and (len(pids) > 1 or workers == 1):
                break
            reply = client.post("/api/incr?key=c")
            if reply.status != 200:
                raise RuntimeError(f"{mode}: POST /api/incr answered {reply.status}")
            body = reply.json
            values.append(body["value"])
            pids.add(body["pid"])
            if (i + 1) % 50 == 0:
                print(f"  {mode}: {i + 1} requests", flush=True)
        log = server.log().splitlines()
    warning = next((line for line in log if "several worker processes" in line), "")
    return DemoResult(mode, values, pids, warning)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.demo",
        description="Start demo_app under gunicorn -w N in each mode (a shared Redis store, "
        "then a memory store without sticky routing), send one user's increments to each, "
        "and print a table of what came back. Uses an embedded redis-server unless "
        "--redis-url is given.",
    )
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers (default 4)")
    parser.add_argument(
        "--requests", type=int, default=200, help="increments per mode (default 200)"
    )
    parser.add_argument("--redis-url", help="use this Redis instead of an embedded one")
    args = parser.parse_args(argv)
    redis_env = {"STATESCALE_STORE": "redis"}
    if args.redis_url:
        redis_env["STATESCALE_REDIS_URL"] = args.redis_url
    print(
        f"statescale demo: {args.requests} x POST /api/incr?key=c with one cookie, "
        f"gunicorn -w {args.workers}; a consistent session returns exactly 1..{args.requests}."
    )
    modes = [
        ("shared (Redis)", redis_env),
        ("memory, no sticky routing", {"STATESCALE_STORE": "memory"}),
    ]
    results = [_demo_mode(name, env, args.workers, args.requests) for name, env in modes]
    print()
    print("| mode | values as expected | distinct worker pids | last value | verdict |")
    print("|---|---|---|---|---|")
    for r in results:
        ok = r.matching == len(r.values)
        verdict = "consistent" if ok else "split: the session resets on another worker"
        print(
            f"| {r.mode} | {r.matching}/{len(r.values)} | {len(r.pids)} | "
            f"{r.values[-1]} | {verdict} |"
        )
    memory = results[1]
    print(f"\nValues the memory mode returned: {sorted(set(memory.values))}")
    if memory.warning:
        print(f"Its start-up warning said why:\n  {memory.warning}")
    # Consistency is the claim; how many workers served depends on who wins each accept.
    return 0 if results[0].matching == len(results[0].values) else 1


if __name__ == "__main__":
    sys.exit(main())
