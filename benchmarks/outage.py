"""Time from request to 503 while Redis is frozen (SIGSTOP), under concurrent users.

    python -m benchmarks.outage [--users 16] [--seconds 3] [--workers 4]

gunicorn -w N serves demo_app in shared mode on a private redis-server. ``--users``
simulated users increment their counters in a loop (each request a write, so none can
be answered from a copy); after a second Redis is paused for ``--seconds``, then
resumed. It prints, for the replies while Redis was frozen, how many were 503 and the
p50, p99 and largest time to them; and how long after SIGCONT every user was served
again.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from statescale.embedded import EmbeddedRedis

from .rig.harness import Gunicorn, Load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.outage",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--users", type=int, default=16, help="concurrent users (default 16)")
    parser.add_argument("--seconds", type=float, default=3.0, help="Redis frozen for (default 3)")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers (default 4)")
    args = parser.parse_args(argv)
    with (
        EmbeddedRedis() as redis,
        Gunicorn(env={"STATESCALE_REDIS_URL": redis.url}, workers=args.workers) as server,
    ):
        frozen_for = f"Redis frozen {args.seconds:g}s"
        print(f"gunicorn -w {args.workers}, {args.users} users writing; {frozen_for}")
        with Load(server.port, users=args.users) as load:
            time.sleep(1.0)
            before = len(load.replies)
            redis.pause()
            time.sleep(args.seconds)
            frozen = load.replies[before:]
            redis.resume()
            resumed = time.monotonic()
            served = [len(answers) for answers in load.answers]
            while time.monotonic() - resumed < 10 and any(
                len(answers) <= n for answers, n in zip(load.answers, served, strict=True)
            ):
                time.sleep(0.005)
            recovered = time.monotonic() - resumed
    unavailable = sorted(t for status, t in frozen if status == 503)
    others = [status for status, _ in frozen if status not in (200, 503)]
    if not unavailable:
        print("no 503 while Redis was frozen?", file=sys.stderr)
        return 1
    p99 = unavailable[max(0, round(0.99 * len(unavailable)) - 1)]
    print(
        f"while frozen: {len(frozen)} replies, {len(unavailable)} x 503, other statuses "
        f"{sorted(set(others)) or 'none'}\n"
        f"time to 503: p50 {statistics.median(unavailable) * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms, max {unavailable[-1] * 1000:.0f} ms\n"
        f"every user had a write answered 200 within {recovered:.2f} s of SIGCONT"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
