"""How fast a membership change reaches every follower, per registry.

    python -m benchmarks.registry [--followers 16] [--changes 20]

Starts a private redis-server and etcd, then for each: ``--followers`` followers (each
with its own connection and watch, as each router and node worker has), and a member
that registers and deregisters ``--changes`` times in all. For each change it times
how long until every follower has seen it, and prints the median and the worst.
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.rig.etcd import EtcdServer
from statescale.embedded import EmbeddedRedis
from statescale.routing.backends import Backend
from statescale.routing.membership import Follower, open_registry

STAYS = Backend("stays", "127.0.0.1", 9001)
MOVES = Backend("moves", "127.0.0.1", 9002)


def _ignore(members: list[Backend]) -> None:
    """The followers' consumer: the benchmark reads what each has seen instead."""


def measure(url: str, followers: int, changes: int) -> list[float]:
    """Seconds until every follower saw each change."""
    registry = open_registry(url)
    registry.register(STAYS, ttl=60, token="bench")
    watching = [Follower(open_registry(url), _ignore).start() for _ in range(followers)]
    every = []
    try:
        for f in watching:
            assert f.wait(lambda m: m == [STAYS], 10), "a follower did not start"
        for change in range(changes):
            want = [MOVES, STAYS] if change % 2 == 0 else [STAYS]
            started = time.monotonic()
            if change % 2 == 0:
                registry.register(MOVES, ttl=60, token="bench")
            else:
                registry.deregister("moves", token="bench")
            for f in watching:
                assert f.wait(want.__eq__, 10), "a change was missed"
            every.append(time.monotonic() - started)
    finally:
        for f in watching:
            f.stop()
        registry.deregister("stays", token="bench")
        registry.close()
    return every


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--followers", type=int, default=16)
    parser.add_argument("--changes", type=int, default=20)
    args = parser.parse_args()
    print(f"{args.followers} followers, {args.changes} changes (half joins, half leaves)")
    print(f"{'registry':<8} {'until every follower: median':>30} {'max':>9}")
    with EmbeddedRedis() as redis, EtcdServer() as etcd:
        for name, url in (("redis", redis.url), ("etcd", f"{etcd.url}/bench")):
            every = measure(url, args.followers, args.changes)
            print(
                f"{name:<8} {statistics.median(every) * 1000:>27.1f} ms"
                f" {max(every) * 1000:>6.1f} ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
