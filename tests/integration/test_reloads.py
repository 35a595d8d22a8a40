"""gunicorn's process changes under load, in every mode: HUP (reload), USR2 (an in-place
upgrade) and --max-requests recycling fail no request, the master and its router live
on, and the embedded Redis stays one per deployment. Numbers refer to
docs/RELIABILITY.md."""

from __future__ import annotations

import signal
import time

import pytest

from benchmarks.rig.harness import Gunicorn, Load, SessionClient

pytestmark = pytest.mark.integration

STICKY = {"STATESCALE_MODE": "sticky"}
#: Who routes: the router in the master, or the sync workers themselves.
ROUTINGS = pytest.mark.parametrize("routing", ["router", "workers"])


def sticky(routing: str) -> dict[str, str]:
    return {**STICKY, "STATESCALE_ROUTING": routing}


def routers(routing: str) -> int:
    return 1 if routing == "router" else 0


def _until(condition: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.1)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param((), id="hup"),
        pytest.param(("--max-requests", "30", "--max-requests-jitter", "10"), id="max-requests"),
    ],
)
@ROUTINGS
def test_33_sticky_reload_and_recycling_fail_no_request(
    args: tuple[str, ...], routing: str
) -> None:
    with Gunicorn(env=sticky(routing), args=args) as server:
        before = server.worker_pids()
        with Load(server.port, users=8) as load:
            time.sleep(1.0)
            if not args:
                server.signal(signal.SIGHUP)
            _until(lambda: not server.worker_pids() & before)
            time.sleep(1.5)
        after = server.children()
        assert server.process is not None and server.process.poll() is None  # the master
        log = server.log()
    assert load.failures == [], load.failures[:5]
    assert load.wrong() == []  # handed over: every counter went on by one
    assert load.requests > 200
    assert not set(after) & before  # every worker replaced
    assert sorted(after.values()).count("router") == routers(routing), after
    assert "Traceback" not in log


def _upgrade_under_load(server: Gunicorn) -> tuple[Load, dict[int, str]]:
    """USR2, then TERM of the old master, while 8 users loop; what they saw, and what
    the new master runs."""
    with Load(server.port, users=8) as load:
        time.sleep(1.0)
        new_master = server.upgrade()
        served = load.requests
        time.sleep(1.5)
        assert load.requests > served  # the new master serves
    return load, server.children(new_master)


@ROUTINGS
def test_33_sticky_upgrade_fails_no_request_and_leaves_one_router(routing: str) -> None:
    with Gunicorn(env=sticky(routing)) as server:
        load, children = _upgrade_under_load(server)
        assert SessionClient(server.port).post("/api/incr?key=c").json["value"] == 1
    assert load.failures == [], load.failures[:5]
    assert load.wrong() == []  # handed over: every counter went on by one
    assert sorted(children.values()) == ["gunicorn"] * 4 + ["router"] * routers(routing)


def test_33_shared_upgrade_fails_no_request_and_loses_nothing(redis_url: str) -> None:
    with Gunicorn(env={"STATESCALE_REDIS_URL": redis_url}) as server:
        load, children = _upgrade_under_load(server)
    assert load.failures == [], load.failures[:5]
    assert load.wrong() == []  # every counter went on by one: nothing lost
    assert sorted(children.values()) == ["gunicorn"] * 4


def test_7_upgrade_with_the_embedded_redis_is_refused_and_loses_nothing() -> None:
    with Gunicorn() as server:  # shared mode on the deployment's embedded server
        with Load(server.port, users=4) as load:
            time.sleep(0.5)
            server.signal(signal.SIGUSR2)
            time.sleep(2.0)
        children = server.children()
        log = server.log()
    assert "USR2 ignored" in log and "embedded redis-server" in log
    assert sorted(children.values()) == ["gunicorn"] * 4 + ["redis-server"]
    assert load.failures == [] and load.wrong() == []


def test_7_preload_starts_one_embedded_redis_for_every_worker() -> None:
    with Gunicorn(args=("--preload",)) as server:
        children = server.children()
        client = SessionClient(server.port)
        replies = [client.post("/api/incr?key=c").json for _ in range(60)]
    assert sorted(children.values()) == ["gunicorn"] * 4 + ["redis-server"]
    assert [r["value"] for r in replies] == list(range(1, 61))
    assert len({r["pid"] for r in replies}) >= 2
