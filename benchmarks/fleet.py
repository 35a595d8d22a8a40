"""What one session write costs Redis as the fleet grows.

    python -m benchmarks.fleet [--sizes 4,16,64,256] [--writes 3000]

For each fleet size N, N processes' stores are connected to one private redis-server,
each as the library sets it up (``RedisStore.from_url``: its own connections and its
per-process copies), all in this process, which Redis cannot tell apart from N
processes. Then a writer that holds no copy saves one session ``--writes`` times, twice:

* *no copies*: every store has read some other session (so Redis tracks it and it
  keeps copies), none the written one;
* *all copies*: before each write, every store reads the written session again (Redis
  tells a holder once, then forgets it until it reads again), so every write meets N
  holders. The reads' own cost, measured alone with the same stores, is taken off.

With ``--masters M``, it also measures it with real processes: bytes Redis sends per
write made through one ``gunicorn -w 4`` alone, then with ``M - 1`` more masters of
``gunicorn -w 4`` on the same Redis, every worker of theirs serving other sessions.

It prints Redis's own CPU time per write (``INFO cpu``, user + system) and the bytes it
sent per write (``INFO stats`` ``total_net_output_bytes``), and the ratio to the
smallest fleet. The cost of a write must not grow with the processes that hold no copy
of it.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import redis

from statescale.embedded import EmbeddedRedis
from statescale.session import Changes
from statescale.stores.redis import RedisStore

WRITTEN = "fleet-written-session-0123456789abcdefghij"
OTHER = "fleet-other-session-0123456789abcdefghij"


def _usage(client: Any) -> tuple[float, int]:
    cpu, stats = client.info("cpu"), client.info("stats")
    return cpu["used_cpu_user"] + cpu["used_cpu_sys"], stats["total_net_output_bytes"]


def measure(url: str, size: int, writes: int, *, holding: bool) -> tuple[float, float]:
    """Redis CPU (µs) and bytes out per write, with ``size`` stores connected."""
    admin = redis.Redis.from_url(url)
    admin.flushall()
    writer = RedisStore.from_url(url, local_cache=0)
    created = writer.create(WRITTEN, {"n": b"0"}).created
    writer.create(OTHER, {"n": b"0"})
    fleet = [RedisStore.from_url(url) for _ in range(size)]
    try:
        for store in fleet:
            for _ in range(2):  # the first read subscribes, the second keeps the copy
                store.load(WRITTEN if holding else OTHER)
        time.sleep(0.2)
        if not holding:
            cpu0, out0 = _usage(admin)
            for n in range(writes):
                writer.save(WRITTEN, Changes({"n": str(n).encode()}, frozenset()), created=created)
            cpu1, out1 = _usage(admin)
            return (cpu1 - cpu0) / writes * 1e6, (out1 - out0) / writes
        rounds = max(1, writes // size)

        def rearm(drop: bool) -> None:
            for store in fleet:
                if drop and store.tracking is not None:
                    store.tracking.drop(store.key(WRITTEN))
                store.load(WRITTEN)

        cpu0, out0 = _usage(admin)
        for _ in range(rounds):  # the reads alone
            rearm(drop=True)
        cpu1, out1 = _usage(admin)
        for n in range(rounds):
            # Each holder reads again (told of the last write; and, the first time, the
            # copy from the reads above is dropped too), so this phase makes exactly
            # the reads of the one before, and the difference is the writes alone.
            rearm(drop=True)
            writer.save(WRITTEN, Changes({"n": str(n).encode()}, frozenset()), created=created)
        cpu2, out2 = _usage(admin)
        cpu = ((cpu2 - cpu1) - (cpu1 - cpu0)) / rounds * 1e6
        return cpu, ((out2 - out1) - (out1 - out0)) / rounds
    finally:
        for store in fleet:
            store.close()


def _bytes_per_write(admin: Any, client: Any, writes: int) -> float:
    out0 = admin.info("stats")["total_net_output_bytes"]
    for _ in range(writes):
        assert client.post("/api/incr?key=n").status == 200
    return float(admin.info("stats")["total_net_output_bytes"] - out0) / writes


def fanout(url: str, masters: int, writes: int) -> tuple[float, float]:
    """Bytes out per write through one master: alone (before the others start and after
    they stop, averaged: which of its own workers hold a copy drifts), and beside
    ``masters - 1`` more."""
    from contextlib import ExitStack

    from benchmarks.rig.harness import Gunicorn, SessionClient

    admin = redis.Redis.from_url(url)
    env = {"STATESCALE_REDIS_URL": url}
    with Gunicorn(env=env) as first:
        client = SessionClient(first.port)
        client.post("/api/incr?key=n")
        client.get("/api/session")
        before = _bytes_per_write(admin, client, writes)
        with ExitStack() as stack:
            others = [stack.enter_context(Gunicorn(env=env)) for _ in range(masters - 1)]
            for server in others:  # their workers hold copies of sessions of their own
                for _ in range(8):
                    other = SessionClient(server.port)
                    other.post("/api/incr?key=n")
                    for _ in range(8):
                        other.get("/api/session")
            time.sleep(0.2)
            beside = _bytes_per_write(admin, client, writes)
        after = _bytes_per_write(admin, client, writes)
    return (before + after) / 2, beside


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fleet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sizes", default="4,16,64,256", help="fleet sizes (default 4,16,64,256)")
    parser.add_argument("--writes", type=int, default=3000, help="writes per measurement")
    parser.add_argument(
        "--masters", type=int, default=0, help="also measure with this many gunicorn -w 4"
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with EmbeddedRedis() as server:
        for size in sizes:
            for holding in (False, True):
                cpu, out = measure(server.url, size, args.writes, holding=holding)
                label = "all copies" if holding else "no copies"
                print(f"  {size:>4} processes, {label:<10} {cpu:8.1f} us  {out:9.0f} B", flush=True)
                rows.append((size, holding, cpu, out))
    base = {holding: (cpu, out) for size, holding, cpu, out in rows if size == sizes[0]}
    print(
        "\n| processes | holding a copy | Redis CPU per write | x smallest | bytes out per write "
        "| x smallest |\n|---|---|---|---|---|---|"
    )
    for size, holding, cpu, out in rows:
        cpu0, out0 = base[holding]
        print(
            f"| {size} | {'all' if holding else 'none'} | {cpu:.1f} us | {cpu / cpu0:.2f} "
            f"| {out:.0f} B | {out / max(out0, 1):.2f} |"
        )
    if args.masters > 1:
        with EmbeddedRedis() as server:
            alone, beside = fanout(server.url, args.masters, min(args.writes, 1000))
        print(
            f"\nbytes Redis sends per write through one gunicorn -w 4: {alone:.0f} B alone, "
            f"{beside:.0f} B beside {args.masters - 1} more ({4 * args.masters} workers): "
            f"{beside / alone:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
