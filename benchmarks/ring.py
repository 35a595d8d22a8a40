"""The ring's balance, movement and lookup cost, beside nginx's ring for comparison.

    python -m benchmarks.ring [--keys 1000000] [--nodes 3,4,8,16,64]

For each N: the largest node's share over the mean share (1.000 is perfect; the
sampling-noise floor for K keys is about 1 + z*sqrt((N-1)/K) with z ~ 2-2.5), the share
of keys that move when one node is added or removed (ideal: 1/(N+1) and 1/N, all of them
to or from that node, none between the others), and the cost of one lookup.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

from statescale.routing import NginxRing, Ring


def keys(n: int) -> list[str]:
    return [os.urandom(24).hex() for _ in range(n)]


def noise_floor(n: int, k: int, draws: int = 3) -> float:
    """max/mean share of a perfectly random assignment of k keys to n nodes (median of
    a few draws): what no hash function can beat with a sample of this size."""
    rng = random.Random(n * 7919 + k)
    results = []
    for _ in range(draws):
        counts = Counter(rng.randrange(n) for _ in range(k))
        results.append(max(counts.values()) / (k / n))
    return sorted(results)[len(results) // 2]


def measure(kind: str, n: int, sample: list[str]) -> dict[str, object]:
    make = Ring if kind == "rendezvous" else NginxRing
    names = [f"10.0.0.{i}:8000" for i in range(n)]
    ring = make(names)
    started = time.perf_counter()
    owners = [ring.owner(k) for k in sample]
    lookup_us = (time.perf_counter() - started) / len(sample) * 1e6
    counts = Counter(owners)
    balance = max(counts.values()) / (len(sample) / n)
    grown = ring.with_node("10.0.1.1:8000")
    added = [grown.owner(k) for k in sample]
    moved_add = sum(a != b for a, b in zip(owners, added, strict=True))
    stray_add = sum(a != b and b != "10.0.1.1:8000" for a, b in zip(owners, added, strict=True))
    shrunk = ring.without_node(names[0])
    removed = [shrunk.owner(k) for k in sample]
    moved_rm = sum(a != b for a, b in zip(owners, removed, strict=True))
    stray_rm = sum(a != b and a != names[0] for a, b in zip(owners, removed, strict=True))
    k = len(sample)
    return {
        "ring": kind,
        "nodes": n,
        "balance": round(balance, 4),
        "moved_on_add": round(moved_add / k, 4),
        "ideal_add": round(1 / (n + 1), 4),
        "moved_between_others_on_add": stray_add,
        "moved_on_remove": round(moved_rm / k, 4),
        "ideal_remove": round(1 / n, 4),
        "moved_between_others_on_remove": stray_rm,
        "lookup_us": round(lookup_us, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--nodes", default="3,4,8,16,64")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    sample = keys(args.keys)
    rows: list[dict[str, object]] = []
    print(f"{args.keys} random IDs", flush=True)
    for n in (int(x) for x in args.nodes.split(",")):
        floor = round(noise_floor(n, len(sample)), 4)
        for kind in ("rendezvous", "nginx"):
            row = measure(kind, n, sample)
            row["noise_floor"] = floor
            rows.append(row)
            print(f"  N={n:<3} {kind:<10} done", flush=True)
    print()
    print(
        "| ring | N | max/mean share | random-assignment floor | moved on add (ideal) | "
        "between others | moved on remove (ideal) | between others | lookup µs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['ring']} | {r['nodes']} | {r['balance']:.3f} | {r['noise_floor']:.3f} | "
            f"{r['moved_on_add']:.4f} ({r['ideal_add']:.4f}) | "
            f"{r['moved_between_others_on_add']} | "
            f"{r['moved_on_remove']:.4f} ({r['ideal_remove']:.4f}) | "
            f"{r['moved_between_others_on_remove']} | {r['lookup_us']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
