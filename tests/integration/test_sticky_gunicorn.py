"""`STATESCALE_MODE=sticky gunicorn -w 4 -b HOST:PORT demo_app:app`: one command, one
master, a router on the public address and a memory store in every worker."""

from __future__ import annotations

import os
import signal
import time
from collections import defaultdict

import pytest

from statescale.harness import Gunicorn, SessionClient

pytestmark = pytest.mark.integration


def test_sticky_mode_under_one_gunicorn_master() -> None:
    with Gunicorn(env={"STATESCALE_MODE": "sticky"}) as server:
        users = [SessionClient(server.port) for _ in range(50)]
        pids: dict[int, set[int]] = defaultdict(set)
        wrong = []
        for round_ in range(1, 41):
            for n, user in enumerate(users):
                reply = user.post("/api/incr?key=c")
                pids[n].add(reply.json["pid"])
                if reply.json["value"] != round_:
                    wrong.append((n, round_, reply.json))
        assert wrong == []
        assert all(len(p) == 1 for p in pids.values())  # each session on one worker, from the start
        workers = server.worker_pids()
        assert set().union(*pids.values()) == workers  # spread over all four

        # kill -9 one worker: it is re-forked into the same slot; only its sessions restart
        victim = next(iter(pids[0]))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (
            len(server.worker_pids()) < 4 or victim in server.worker_pids()
        ) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        afresh = kept = failed = 0
        for user in users:
            reply = user.post("/api/incr?key=c")
            if reply.status != 200:
                failed += 1
            elif reply.json["value"] == 1:
                afresh += 1
            elif reply.json["value"] == 41:
                kept += 1
        log = server.log()
    assert failed == 0
    assert afresh + kept == 50
    assert afresh == sum(1 for p in pids.values() if victim in p)  # exactly the victim's users
    assert "sticky router on http://" in log and "several worker processes" not in log
