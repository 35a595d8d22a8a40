"""Affinity mode under one gunicorn master: the router (or, with
``STATESCALE_ROUTING=workers``, the workers themselves) sends each session to its owner,
which serves reads from its copy and writes through to Redis. A worker's crash or a
reload loses nothing."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import pytest
import redis

from benchmarks.rig.harness import Gunicorn, Load, SessionClient

pytestmark = pytest.mark.integration

USERS = 20


ROUTINGS = pytest.mark.parametrize("routing", ["router", "workers"])


def affinity(redis_url: str, routing: str = "router") -> dict[str, str]:
    return {
        "STATESCALE_MODE": "affinity",
        "STATESCALE_REDIS_URL": redis_url,
        "STATESCALE_ROUTING": routing,
    }


def processes(routing: str) -> list[str]:
    """What the master runs: four workers, and its router unless they route."""
    return ["gunicorn"] * 4 + (["router"] if routing == "router" else [])


def _until(condition: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.1)


@ROUTINGS
def test_the_owner_serves_reads_from_its_copy(
    redis_url: str, raw_redis: redis.Redis, routing: str
) -> None:
    with Gunicorn(env=affinity(redis_url, routing)) as server:
        children = server.children()
        clients = [SessionClient(server.port) for _ in range(8)]
        for n, client in enumerate(clients):
            client.post(f"/api/set?key=a&value={n}")
            client.get("/api/session")  # its return: the first lifetime slides
        raw_redis.config_resetstat()
        owners = set()
        for _ in range(20):
            for n, client in enumerate(clients):
                reply = client.get("/api/session").json
                assert reply["data"] == {"a": str(n)}
                owners.add((n, reply["pid"]))
        stats = raw_redis.info("commandstats")
    assert sorted(children.values()) == processes(routing)
    assert len(owners) == len(clients)  # each session always reached one worker
    assert sorted(Counter(pid for _, pid in owners).values()) == [2] * 4  # new ones take turns
    assert "cmdstat_hgetall" not in stats  # ...which answered from its copy
    assert "cmdstat_evalsha" not in stats


def test_a_write_goes_through_to_redis_in_one_round_trip(
    redis_url: str, raw_redis: redis.Redis
) -> None:
    with Gunicorn(env=affinity(redis_url)) as server:
        client = SessionClient(server.port)
        client.post("/api/incr?key=c")
        client.get("/api/session")
        raw_redis.config_resetstat()
        values = [client.post("/api/incr?key=c").json["value"] for _ in range(30)]
        stats = raw_redis.info("commandstats")
    assert values == list(range(2, 32))
    assert stats["cmdstat_evalsha"]["calls"] == 30
    assert "cmdstat_hgetall" not in stats  # the owner's copy took its own writes


@ROUTINGS
def test_kill_9_of_a_worker_fails_at_most_the_requests_in_flight(
    redis_url: str, routing: str
) -> None:
    server = Gunicorn(env=affinity(redis_url, routing))
    with server, Load(server.port, users=USERS) as load:
        time.sleep(1.0)
        victim = min(server.worker_pids())
        os.kill(victim, signal.SIGKILL)
        _until(lambda: len(server.worker_pids() - {victim}) == 4)
        served = load.requests
        time.sleep(1.5)
        assert load.requests > served + 100
    assert max(load.failures_per_user()) <= 1, load.failures[:5]
    assert load.wrong() == []  # nothing lost: every counter went on
    assert all(len(seen) > 10 for seen in load.answers)


@ROUTINGS
@pytest.mark.parametrize("how", ["hup", "usr2"])
def test_reload_and_upgrade_fail_nothing_and_lose_nothing(
    redis_url: str, how: str, routing: str
) -> None:
    with Gunicorn(env=affinity(redis_url, routing)) as server:
        before = server.worker_pids()
        with Load(server.port, users=USERS) as load:
            time.sleep(1.0)
            if how == "hup":
                server.signal(signal.SIGHUP)
                _until(lambda: not server.worker_pids() & before)
                children = server.children()
            else:
                children = server.children(server.upgrade())
            time.sleep(1.5)
    assert load.failures == [], load.failures[:5]
    assert load.wrong() == []
    assert load.requests > 300
    assert sorted(children.values()) == processes(routing)
    assert not set(children) & before  # every worker replaced


# -- what an independent review found (each test failed on the code before) -------------


def _shared_increments(
    server: Gunicorn, cookie: str, seconds: float, meanwhile: object = None
) -> tuple[int, int]:
    """8 users sharing one session increment it in parallel for ``seconds``
    (``meanwhile()`` half a second in): increments acknowledged, and how far the
    stored counter moved."""
    header = f"statescale={cookie}"

    def value() -> int:
        reply = SessionClient(server.port).request("GET", "/api/session", cookie_header=header)
        return int(reply.json["data"]["n"])

    acknowledged: list[int] = []
    stop = threading.Event()

    def user() -> None:
        client = SessionClient(server.port)
        while not stop.is_set():
            reply = client.request("POST", "/api/incr?key=n", cookie_header=header)
            if reply.status == 200:
                acknowledged.append(1)

    before = value()
    users = [threading.Thread(target=user) for _ in range(8)]
    for thread in users:
        thread.start()
    time.sleep(0.5)
    if meanwhile is not None:
        meanwhile()  # type: ignore[operator]
    time.sleep(seconds - 0.5)
    stop.set()
    for thread in users:
        thread.join(20)
    return len(acknowledged), value() - before


def test_parallel_requests_of_one_session_on_threads_lose_no_update(redis_url: str) -> None:
    # Affinity relied on one process per session; with --threads, two threads of the
    # owner read n and both wrote n + 1 (40 increments moved the counter 15).
    with Gunicorn(env=affinity(redis_url), workers=2, args=("--threads", "4")) as server:
        owner = SessionClient(server.port)
        owner.post("/api/incr?key=n")
        assert owner.cookie is not None
        acknowledged, moved = _shared_increments(server, owner.cookie, 1.5)
    assert acknowledged > 50 and moved == acknowledged


def test_a_reload_of_workers_that_route_serves_a_session_in_one_worker_at_a_time(
    redis_url: str,
) -> None:
    # STATESCALE_ROUTING=workers: at a HUP, the old worker drained its slot's channel
    # while its successor read it too: one session's requests in two workers at once,
    # and about one increment in eight lost.
    with Gunicorn(env=affinity(redis_url, "workers"), workers=2) as server:
        owner = SessionClient(server.port)
        owner.post("/api/incr?key=n")
        assert owner.cookie is not None
        before = server.worker_pids()
        acknowledged, moved = _shared_increments(
            server, owner.cookie, 2.5, lambda: server.signal(signal.SIGHUP)
        )
        assert not server.worker_pids() & before  # reloaded meanwhile
    assert acknowledged > 100 and moved == acknowledged
