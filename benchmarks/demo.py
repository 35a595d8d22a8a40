"""``python -m benchmarks.demo``: the demo comparison, the project's main job.

It runs ``demo_app`` under ``gunicorn -w 4`` in each mode a user chooses between, side by
side, on redis-servers the toolkit starts itself (unless ``--redis-url``):

* **shared**: every worker reads and writes one Redis;
* **sticky**: the router in the master sends each session to one worker, which keeps
  it in memory;
* **affinity**: the same routing, in front of Redis;
* **memory, no sticky**: what breaks: each worker keeps its own sessions.

and, beside them, a Flask app with no session library at all: the ceiling. Per mode:

* **consistency**: one user's increments, each answer checked (exact, or split between
  workers);
* **throughput**: reads (``GET /api/session``) and writes (``POST /api/incr``) over 32
  sessions, as a ratio to the ceiling's ``GET /health``, measured in the same run;
* **a worker killed** (``kill -9``) under load from 16 users: requests failed, sessions
  lost (a user whose counter did not carry on);
* **a graceful reload** (``HUP``) under the same load: requests failed, sessions lost.

It prints a table with a line on which mode to choose, writes ``demo.png`` (and
``demo.md``, ``demo.json``) to ``--out``, and exits 1 if a mode that must be
consistent was not. About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from .rig.harness import Gunicorn, Load, SessionClient, stop_together
from .rig.loadgen import GENERATORS, generator, run_load

CEILING_APP = "benchmarks.rig.peer_apps:plain_app"
HEALTH = ("GET", "/health")
READ = ("GET", "/api/session")
WRITE = ("POST", "/api/incr?key=n")


@dataclass
class Mode:
    """One mode, running, and what was measured of it."""

    name: str
    env: dict[str, str]
    must_be_consistent: bool
    server: Gunicorn | None = field(default=None, repr=False)
    values: list[int] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)
    reads: float = 0.0  # requests a second, the median of the rounds
    writes: float = 0.0
    read_range: tuple[float, float] = (0.0, 0.0)  # the rounds' lowest and highest
    # failed requests, of how many; users whose session was lost, of how many
    faults: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)

    @property
    def consistent(self) -> bool:
        return self.values == list(range(1, len(self.values) + 1))


def modes(redis_url: str | None) -> list[Mode]:
    redis = {"STATESCALE_REDIS_URL": redis_url} if redis_url else {}
    return [
        Mode("shared", {"STATESCALE_MODE": "shared", **redis}, True),
        Mode("sticky", {"STATESCALE_MODE": "sticky"}, True),
        Mode("affinity", {"STATESCALE_MODE": "affinity", **redis}, True),
        Mode("memory, no sticky", {"STATESCALE_STORE": "memory"}, False),
    ]


class Progress:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, line: str) -> None:
        print(f"[{time.monotonic() - self.started:5.1f}s] {line}", flush=True)


def consistency(mode: Mode, requests: int) -> None:
    """One user's ``requests`` increments, and who served them; more, up to ten times
    as many, until two workers have (the kernel may hand a short run of connections to
    one worker, and a split would not show)."""
    assert mode.server is not None
    client = SessionClient(mode.server.port)
    more = 1 if mode.must_be_consistent else 10  # (a routed mode's user has one worker)
    for done in range(requests * more):
        if done >= requests and len(mode.pids) > 1:
            break
        reply = client.post("/api/incr?key=c")
        if reply.status != 200:
            raise RuntimeError(f"{mode.name}: POST /api/incr answered {reply.status}")
        mode.values.append(reply.json["value"])
        mode.pids.add(reply.json["pid"])


def _cookies(port: int, count: int) -> list[str]:
    cookies = []
    for _ in range(count):
        client = SessionClient(port)
        client.post("/api/incr?key=n")
        if client.cookie:
            cookies.append(client.cookie)
    return cookies


def under_load(port: int, action: Callable[[], None], users: int) -> tuple[int, int, int, int]:
    """``users`` looping increments; ``action`` a second in. (Requests failed, of how
    many, users whose counter did not carry on, of how many.)"""
    with Load(port, users=users, key=f"fault{time.monotonic_ns()}") as load:
        time.sleep(1.0)
        action()
        time.sleep(2.0)
    lost = {user for user, _, _ in load.wrong()}
    return len(load.failures), load.requests, len(lost), users


def _kill_a_worker(server: Gunicorn) -> Callable[[], None]:
    return lambda: os.kill(min(server.worker_pids()), signal.SIGKILL)


def _reload(server: Gunicorn) -> Callable[[], None]:
    return lambda: server.signal(signal.SIGHUP)


def table(rows: list[Mode], ceiling: float) -> str:
    lines = [
        "| mode | consistency | reads (x ceiling) | writes (x ceiling) | "
        "kill -9 of a worker: requests failed / users who lost their session | "
        "HUP reload: the same |",
        "|---|---|---|---|---|---|",
    ]
    for m in rows:
        served = f"{len(m.pids)} worker" + ("" if len(m.pids) == 1 else "s")
        if m.consistent:
            verdict = f"exact, {len(m.values)}/{len(m.values)} ({served})"
        else:
            good = sum(v == i for i, v in enumerate(m.values, 1))
            verdict = f"**split**: {good}/{len(m.values)} right ({served})"

        def fault(name: str, m: Mode = m) -> str:
            if not m.must_be_consistent:
                return "n/a: split already"
            failed, requests, lost, users = m.faults[name]
            return f"{failed} of {requests} / {lost} of {users}"

        lines.append(
            f"| {m.name} | {verdict} | {m.reads:.0f} ({m.reads / ceiling:.2f}) | "
            f"{m.writes:.0f} ({m.writes / ceiling:.2f}) | {fault('kill')} | {fault('reload')} |"
        )
    return "\n".join(lines)


def advice(rows: dict[str, Mode], ceiling: float) -> str:
    """The line under the table: which mode to choose when, with this run's figures."""
    shared, sticky, affinity = rows["shared"], rows["sticky"], rows["affinity"]
    split = rows["memory, no sticky"]

    def speed(m: Mode) -> str:
        return f"reads {m.reads / ceiling:.2f}x, writes {m.writes / ceiling:.2f}x the ceiling"

    def lost(m: Mode) -> int:
        return m.faults["kill"][2] + m.faults["reload"][2]

    # A claim only where the rounds do not overlap: runs differ by up to 10% here.
    if affinity.read_range[1] < shared.read_range[0]:
        router = "on one machine its router cost more than it saved"
    elif affinity.read_range[0] > shared.read_range[1]:
        router = f"it read {affinity.reads / shared.reads:.2f}x as fast as shared mode here"
    else:
        router = "its reads were shared mode's, within this run's spread"
    return (
        f"Which to choose: shared when any worker must serve any session ({speed(shared)}; "
        f"a crash and a reload lost {lost(shared)} sessions); affinity when a router can "
        f"send each session to its owner, for reads from memory with Redis behind "
        f"({speed(affinity)}; lost {lost(affinity)}; {router}, and across machines it "
        f"spares Redis the reads); sticky only without "
        f"Redis ({speed(sticky)}; a crash lost {sticky.faults['kill'][2]} of "
        f"{sticky.faults['kill'][3]} users, a reload {sticky.faults['reload'][2]}). Never the "
        f"memory store without sticky routing: one user's session was split over "
        f"{len(split.pids)} workers."
    )


def plot(rows: list[Mode], ceiling: float, path: Path) -> bool:
    """``path``: throughput against the ceiling, and what a crash and a reload cost."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [m.name for m in rows]
    xs = list(range(len(rows)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for offset, label, values in (
        (-0.2, "reads", [m.reads / ceiling for m in rows]),
        (0.2, "writes", [m.writes / ceiling for m in rows]),
    ):
        left.bar([x + offset for x in xs], values, width=0.4, label=label)
    for x, m in zip(xs, rows, strict=True):
        if not m.consistent:  # fast, and wrong: say so on the picture
            top = max(m.reads, m.writes) / ceiling
            left.text(x, top + 0.03, "wrong answers", ha="center", color="red")
    left.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    left.set_xticks(xs, names, rotation=15)
    left.set_ylabel("throughput / session-less ceiling")
    left.set_title("throughput (gunicorn -w 4)")
    left.legend()
    checked = [m for m in rows if m.must_be_consistent]
    cx = list(range(len(checked)))
    for offset, label, key in ((-0.2, "kill -9 of a worker", "kill"), (0.2, "HUP", "reload")):
        lost = [100 * m.faults[key][2] / m.faults[key][3] for m in checked]
        right.bar([x + offset for x in cx], lost, width=0.4, label=label)
    right.set_xticks(cx, [m.name for m in checked])
    right.set_ylabel("% of users whose session was lost")
    right.set_ylim(0, 100)
    right.set_title("faults under load (memory, no sticky: split already)")
    right.legend()
    fig.suptitle(f"statescale demo, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _figures(mode: Mode) -> dict[str, object]:
    return {
        "consistent": mode.consistent,
        "values": mode.values,
        "workers_seen": len(mode.pids),
        "reads_rps": mode.reads,
        "writes_rps": mode.writes,
        "faults": {
            k: dict(zip(("failed", "requests", "lost", "users"), v, strict=True))
            for k, v in mode.faults.items()
        },
    }


def throughput(
    ceiling_server: Gunicorn,
    rows: list[Mode],
    args: argparse.Namespace,
    tool: str,
    say: Callable[[str], None],
) -> float:
    """The ceiling's ``/health`` and each mode's reads and writes, in ``args.rounds``
    rounds, each round starting one further on: on a shared VM a run's place in the
    sequence moves it by more than the gaps between modes, so none is always first or
    always last. Sets each mode's median reads and writes; returns the ceiling's."""
    cookies = {m.name: _cookies(m.server.port, 32) for m in rows if m.server is not None}
    ceilings: list[float] = []
    reads: dict[str, list[float]] = {m.name: [] for m in rows}
    writes: dict[str, list[float]] = {m.name: [] for m in rows}
    turns: list[Mode | None] = [None, *rows]  # None: the ceiling
    say("warming up: one short run of each, not counted")
    for row in rows:  # a fresh server's first second runs well below its pace
        assert row.server is not None  # (reads and writes mixed: both paths warm)
        run_load(row.server.port, cookies[row.name], writes=0.5, duration=1, tool=tool)
    run_load(ceiling_server.port, [], writes=0, route=HEALTH, duration=1, tool=tool)
    for n in range(args.rounds):
        turn = n % len(turns)
        for m in turns[turn:] + turns[:turn]:
            if m is None:
                rps = run_load(
                    ceiling_server.port,
                    [],
                    writes=0,
                    route=HEALTH,
                    duration=args.seconds,
                    tool=tool,
                ).rps
                ceilings.append(rps)
                say(f"round {n + 1}/{args.rounds}: ceiling GET /health {rps:.0f} req/s")
                continue
            assert m.server is not None
            port, jar = m.server.port, cookies[m.name]
            for writing, route, got in ((0, READ, reads), (1, WRITE, writes)):
                rps = run_load(
                    port, jar, writes=writing, route=route, duration=args.seconds, tool=tool
                ).rps
                got[m.name].append(rps)
            say(
                f"round {n + 1}/{args.rounds}: {m.name}: reads {reads[m.name][-1]:.0f} "
                f"req/s, writes {writes[m.name][-1]:.0f} req/s"
            )
    for m in rows:
        m.reads, m.writes = statistics.median(reads[m.name]), statistics.median(writes[m.name])
        m.read_range = (min(reads[m.name]), max(reads[m.name]))
    return statistics.median(ceilings)


def run(args: argparse.Namespace) -> int:
    say = Progress()
    rows = modes(args.redis_url)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tool = generator(args.loadgen)
    with ExitStack() as stack:
        say(f"starting the ceiling and {len(rows)} modes under gunicorn -w {args.workers}")
        ceiling_server = Gunicorn(app=CEILING_APP, workers=args.workers)
        for m in rows:
            m.server = Gunicorn(env=m.env, workers=args.workers)
        with ThreadPoolExecutor(3) as pool:  # each waits for its workers: start side by side
            servers = [ceiling_server, *(m.server for m in rows if m.server)]
            list(pool.map(stack.enter_context, servers))
        for m in rows:
            consistency(m, args.requests)
            state = "exact" if m.consistent else "SPLIT"
            say(f"{m.name}: {args.requests} increments by one user: {state}")
        ceiling = throughput(ceiling_server, rows, args, tool, say)
        for m in rows:
            if not m.must_be_consistent or m.server is None:
                continue
            m.faults["reload"] = under_load(m.server.port, _reload(m.server), args.users)
            m.faults["kill"] = under_load(m.server.port, _kill_a_worker(m.server), args.users)
            (hf, hn, hl, _), (kf, kn, kl, _) = m.faults["reload"], m.faults["kill"]
            say(
                f"{m.name}: HUP: {hf} of {hn} requests failed, {hl} sessions lost; "
                f"kill -9: {kf} of {kn} failed, {kl} lost (of {args.users} users)"
            )
        say("done; stopping everything")
        stop_together()
    text = table(rows, ceiling)
    line = advice({m.name: m for m in rows}, ceiling)
    print(f"\n{text}\n\n{line}\n")
    (out / "demo.md").write_text(f"{text}\n\n{line}\n")
    data = {m.name: _figures(m) for m in rows}
    (out / "demo.json").write_text(json.dumps({"ceiling": ceiling, "modes": data}, indent=1))
    pictured = plot(rows, ceiling, out / "demo.png")
    picture = f", {out / 'demo.png'}" if pictured else " (no picture: pip install matplotlib)"
    print(f"wrote {out / 'demo.md'}, {out / 'demo.json'}{picture}")
    return verdict(rows)


def verdict(rows: list[Mode]) -> int:
    """The exit status: 1 if a mode that must be consistent was not (and say which)."""
    broken = [m.name for m in rows if m.must_be_consistent and not m.consistent]
    if broken:
        print(f"NOT CONSISTENT: {', '.join(broken)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.demo",
        description="Run demo_app under gunicorn -w 4 in shared, sticky and affinity mode "
        "and with the memory store without sticky routing, side by side with a session-less "
        "ceiling; measure consistency, throughput, a worker killed and a reload under load; "
        "print a table and write demo.png. Uses redis-servers it starts itself unless "
        "--redis-url is given. Throughput runs alternate in rounds, after a warm-up "
        "(medians printed). About 70 seconds.",
    )
    parser.add_argument("--out", default="demo-results", help="folder for demo.png/.md/.json")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers (default 4)")
    parser.add_argument("--requests", type=int, default=100, help="one user's increments")
    parser.add_argument(
        "--seconds", type=float, default=1.0, help="seconds per load run (default 1)"
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="alternating rounds of load runs (default 4)"
    )
    parser.add_argument("--users", type=int, default=16, help="users during the faults")
    parser.add_argument("--redis-url", help="use this Redis instead of embedded ones")
    parser.add_argument(
        "--loadgen", choices=GENERATORS, default="auto", help="wrk, python or auto (default)"
    )
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
