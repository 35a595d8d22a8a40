"""Per-process copies that Redis's invalidations keep current, on a real redis-server.

Two stores with their own clients stand for two worker processes."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
import redis

from statescale.embedded import EmbeddedRedis
from statescale.exceptions import StoreUnavailable
from statescale.session import Changes
from statescale.stores.redis import RedisStore, subscription
from tests.conftest import Clock


def fields(store: RedisStore, sid: str, min_version: int = 0) -> dict[str, bytes] | None:
    record = store.load(sid, min_version=min_version)
    return None if record is None else dict(record.fields)


def later() -> None:
    """The next request: it reaches a worker after the writer has answered its client,
    so after Redis has sent the invalidation (the same event-loop pass as the writer's
    reply). In one test process there is no such hop, so wait."""
    time.sleep(0.02)


def warm(store: RedisStore, sid: str) -> None:
    """Two reads: the first subscribes, the second is kept."""
    fields(store, sid)
    fields(store, sid)
    assert store.tracking is not None and store.key(sid) in store.tracking.copies._copies


def calls(raw_redis: redis.Redis, command: str) -> int:
    stats = raw_redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {"calls": 0})["calls"])


def test_a_write_costs_one_read_in_each_other_holder_and_none_in_the_writer(
    redis_url: str, raw_redis: redis.Redis
) -> None:
    a, b = RedisStore.from_url(redis_url), RedisStore.from_url(redis_url)
    created = a.create("s", {"n": b"0"}).created
    warm(a, "s")
    warm(b, "s")
    raw_redis.config_resetstat()
    for n in range(1, 201):
        writer, reader = (a, b) if n % 2 else (b, a)
        assert fields(reader, "s") == {"n": str(n - 1).encode()}
        version = writer.save("s", Changes({"n": str(n).encode()}, frozenset()), created=created)
        # The client's next request carries the version it was told (the _v cookie): no
        # copy older than that is served, however late the invalidation arrives.
        assert fields(reader, "s", version) == {"n": str(n).encode()}
        assert fields(writer, "s", version) == {"n": str(n).encode()}
    # Each write cost the other holder one read; the writer's copy took its own write
    # (a writer that read its own writes back would make it 400). A read that an
    # invalidation overtook is not kept, so now and then one more: on a slow machine,
    # up to a few dozen.
    assert 200 <= calls(raw_redis, "hgetall") <= 300
    assert calls(raw_redis, "evalsha") == 200
    assert calls(raw_redis, "ping") == 0  # a process that keeps up never has to catch up


def test_processes_without_a_copy_cost_a_write_nothing(
    redis_url: str, raw_redis: redis.Redis
) -> None:
    writer = RedisStore.from_url(redis_url)
    created = writer.create("written", {"n": b"0"}).created
    writer.create("other", {"n": b"0"})

    def bytes_per_write() -> float:
        before = raw_redis.info("stats")["total_net_output_bytes"]
        for n in range(50):
            writer.save("written", Changes({"n": str(n).encode()}, frozenset()), created=created)
        return (raw_redis.info("stats")["total_net_output_bytes"] - before) / 50

    alone = bytes_per_write()
    fleet = [RedisStore.from_url(redis_url) for _ in range(20)]
    for store in fleet:
        warm(store, "other")  # subscribed, holding copies: just not of "written"
    assert bytes_per_write() < alone + 1  # (INFO's own reply grows by a digit or two)
    for store in fleet:
        warm(store, "written")
    # Holders hear of the first write only: Redis forgets a key once it has told.
    assert bytes_per_write() < alone + 20 * 120 / 50  # one message of ~100 B each


def test_deletes_reach_every_copy(redis_url: str) -> None:
    a, b = RedisStore.from_url(redis_url), RedisStore.from_url(redis_url)
    a.create("s", {"x": b"1"})
    warm(b, "s")
    a.delete("s")
    later()
    assert fields(b, "s") is None


def test_regenerate_drops_the_old_record_everywhere(redis_url: str) -> None:
    a, b = RedisStore.from_url(redis_url), RedisStore.from_url(redis_url)
    a.create("old", {"x": b"1"})
    warm(b, "old")
    a.create("new", {"x": b"1"}, replaces="old")
    later()
    assert fields(b, "old") is None
    assert fields(b, "new") == {"x": b"1"}


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda r, key: r.delete(key), id="DEL"),
        pytest.param(lambda r, key: r.hset(key, "x", b"2"), id="HSET"),
        pytest.param(lambda r, key: r.flushall(), id="FLUSHALL"),
        pytest.param(lambda r, key: r.pexpire(key, 1), id="expiry"),
    ],
)
def test_a_change_made_behind_statescales_back_is_seen_at_once(
    redis_url: str, raw_redis: redis.Redis, change: object
) -> None:
    store = RedisStore.from_url(redis_url)
    store.create("s", {"x": b"1"})
    warm(store, "s")
    change(raw_redis, store.key("s"))  # type: ignore[operator]
    time.sleep(0.2)  # an expiry is noticed by Redis's active expiry within 100 ms
    assert fields(store, "s") in (None, {"x": b"2"})


def test_idle_timeout_slides_through_the_script_when_it_runs_down(
    redis_url: str, raw_redis: redis.Redis, clock: Clock
) -> None:
    a = RedisStore.from_url(redis_url, clock=clock, idle_timeout=600, absolute_lifetime=None)
    b = RedisStore.from_url(redis_url, clock=clock, idle_timeout=600, absolute_lifetime=None)
    assert a.tracking is not None
    a.create("s", {"x": b"1"})
    warm(a, "s")
    warm(b, "s")
    raw_redis.pexpire(a.key("s"), 100_000)  # as if 500 s had passed
    later()
    clock.now += a.tracking.copies.touch_interval + 1
    assert fields(a, "s") == {"x": b"1"}  # a miss: reads, finds the TTL low, slides it
    assert raw_redis.pttl(a.key("s")) > 590_000
    assert fields(b, "s") == {"x": b"1"}


def test_restart_clears_the_copies_and_invalidations_flow_again(
    own_redis: EmbeddedRedis,
) -> None:
    a, b = RedisStore.from_url(own_redis.url), RedisStore.from_url(own_redis.url)
    a.create("s", {"x": b"1"})
    warm(b, "s")
    own_redis.stop()
    own_redis.start()  # an empty server
    assert fields(b, "s") is None  # the old copy is not served
    created = a.create("s", {"x": b"2"}).created
    warm(b, "s")
    assert fields(b, "s") == {"x": b"2"}
    a.save("s", Changes({"x": b"3"}, frozenset()), created=created)
    later()
    assert fields(b, "s") == {"x": b"3"}  # no version asked for: the invalidation did it


@pytest.mark.parametrize("victim", ["pubsub", "normal"])
def test_a_lost_connection_drops_the_copies_and_tracking_resumes(
    redis_url: str, raw_redis: redis.Redis, victim: str
) -> None:
    """Redis forgets what a closed connection read: without the subscription nothing
    can be told, and a data connection's tracked keys are gone with it."""
    a, b = RedisStore.from_url(redis_url), RedisStore.from_url(redis_url)
    created = a.create("s", {"x": b"1"}).created
    warm(b, "s")
    raw_redis.client_kill_filter(_type=victim, skipme=True)
    a.save("s", Changes({"x": b"2"}, frozenset()), created=created)
    later()
    assert fields(b, "s") == {"x": b"2"}
    warm(b, "s")
    a.save("s", Changes({"x": b"3"}, frozenset()), created=created)
    later()
    assert fields(b, "s") == {"x": b"3"}


def test_an_idle_process_keeps_up(redis_url: str) -> None:
    a, b = RedisStore.from_url(redis_url), RedisStore.from_url(redis_url)
    created = a.create("keep", {"x": b"1"}).created
    warm(b, "keep")
    for n in range(2000):
        a.save("keep", Changes({"n": str(n).encode()}, frozenset()), created=created)
    later()
    assert fields(b, "keep") == {"x": b"1", "n": b"1999"}


def test_a_backlog_held_back_in_redis_is_read_before_a_copy_is_served(
    redis_url: str, raw_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # b neither serves nor drains (no background thread) while a changes thousands of
    # the sessions b holds copies of: b may not have all of it in one read of its
    # socket, so it must sync (PING) before it serves a copy.
    monkeypatch.setattr(subscription, "IDLE_DRAIN", 3600.0)
    a, b = RedisStore.from_url(redis_url), RedisStore.from_url(redis_url, local_cache=5000)
    sessions = [f"flood-{n}" for n in range(3000)]
    created = {sid: a.create(sid, {"x": b"1"}, replaces="nothing").created for sid in sessions}
    for sid in sessions:
        fields(b, sid)
    warm(b, "flood-0")
    time.sleep(0.1)  # the thread has drained once and now sleeps
    for sid in sessions[1:]:
        a.save(sid, Changes({"x": b"2"}, frozenset()), created=created[sid])
    later()
    raw_redis.config_resetstat()
    assert fields(b, "flood-0") == {"x": b"1"}  # untouched: served from the copy...
    assert calls(raw_redis, "ping") == 1  # ...after catching up
    assert calls(raw_redis, "hgetall") == 0
    assert fields(b, "flood-2999") == {"x": b"2"}


def test_under_the_lock_reads_come_from_redis(redis_url: str, raw_redis: redis.Redis) -> None:
    store = RedisStore.from_url(redis_url)
    store.create("s", {"x": b"1"})
    warm(store, "s")
    raw_redis.config_resetstat()
    with store.lock("s"):
        assert fields(store, "s") == {"x": b"1"}
    assert calls(raw_redis, "hgetall") == 1


def test_a_forked_child_starts_with_no_copies(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    created = store.create("s", {"x": b"1"}).created
    warm(store, "s")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its parent's copy and subscription are not its own
        try:
            store.save("s", Changes({"x": b"2"}, frozenset()), created=created)
            ok = fields(store, "s") == {"x": b"2"}
            os.write(write, b"ok" if ok else b"no")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 2) == b"ok"
    later()
    assert fields(store, "s") == {"x": b"2"}  # the parent heard of the child's write


def test_a_read_in_flight_beside_this_processs_own_write_is_not_kept(redis_url: str) -> None:
    # Threads of one process: A has read the record and is descheduled before keeping
    # it; B writes on the connection A's read went out on (the idle list gives back the
    # last one used), and Redis tells no connection of its own writes (NOLOOP). A's
    # reply must not become the copy: no invalidation would ever remove it.
    store = RedisStore.from_url(redis_url)
    created = store.create("s", {"x": b"old"}).created
    fields(store, "s")  # subscribes
    tracking = store.tracking
    assert tracking is not None
    tracking.drop(store.key("s"))
    in_hand, written = threading.Event(), threading.Event()
    keep = tracking.read

    def descheduled(*args: Any, **kwargs: Any) -> None:
        in_hand.set()
        written.wait(5)
        keep(*args, **kwargs)

    tracking.read = descheduled  # type: ignore[method-assign]
    reader = threading.Thread(target=store.load, args=("s",))
    reader.start()
    assert in_hand.wait(5)
    tracking.read = keep  # type: ignore[method-assign]
    (used,) = tracking._idle
    store.save("s", Changes({"x": b"new"}, frozenset()), created=created)
    assert tracking._idle == [used]  # the write went out where the read had
    written.set()
    reader.join(5)
    later()
    assert fields(store, "s") == {"x": b"new"}


_C_FORK = """
import ctypes, os, select, signal, sys, threading
from statescale.session import Changes
from statescale.stores.redis import RedisStore

store = RedisStore.from_url(sys.argv[1])
created = store.create("s", {"x": b"1"}).created
store.load("s"); store.load("s")  # subscribed, and a copy kept
tracking = store.tracking
holding, release = threading.Event(), threading.Event()

def hold_the_lock():
    with tracking._lock:
        holding.set()
        release.wait(10)

holder = threading.Thread(target=hold_the_lock)
holder.start()
assert holding.wait(5)
read, write = os.pipe()
pid = ctypes.PyDLL(None).fork()  # PyDLL: the GIL stays held across it
if pid == 0:
    try:
        loaded = dict(store.load("s").fields)
        store.save("s", Changes({"x": b"2"}, frozenset()), created=created)
        ok = loaded == {"x": b"1"} and dict(store.load("s").fields) == {"x": b"2"}
        os.write(write, b"ok" if ok else b"no")
    finally:
        os._exit(0)
release.set()
holder.join()
os.close(write)
answered = select.select([read], [], [], 10)[0]
if not answered:
    os.kill(pid, signal.SIGKILL)
os.waitpid(pid, 0)
print(os.read(read, 2).decode() if answered else "the child hung")
"""


def test_a_fork_without_pythons_fork_hooks_starts_afresh(redis_url: str) -> None:
    # uWSGI makes its workers with C's fork() unless py-call-osafterfork is set: no
    # at-fork hook runs. The child notices on its first call, even when a thread of the
    # parent held the copies' lock at the fork (a thread the child does not have). In a
    # process of its own: a fork copies every lock any thread holds, and this test's
    # process has other tests' threads (a child that needs their locks would hang).
    import subprocess
    import sys

    ran = subprocess.run(
        [sys.executable, "-c", _C_FORK, redis_url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ran.stdout.strip() == "ok", (ran.stdout, ran.stderr)


def test_a_round_trip_reads_each_reply_and_raises_the_first_error_after_them(
    redis_url: str, raw_redis: redis.Redis
) -> None:
    # statescale's own connections read replies past redis-py's parser: error replies
    # come back as redis-py's exceptions, after every reply was read.
    direct = subscription.Direct(raw_redis.connection_pool)
    raw_redis.set("plain", "x")
    assert direct.call(("SET", "k", "v"), ("GET", "k"), ("PTTL", "k")) == [b"OK", b"v", -1]
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        direct.call(("HGETALL", "plain"), ("SET", "after", "1"))
    assert raw_redis.get("after") == b"1"  # the second command ran, its reply was read
    assert direct.call(("PING",)) == [b"PONG"]  # and the connection stays in step
    with pytest.raises(redis.exceptions.NoScriptError):
        direct.call(("EVALSHA", "0" * 40, 0))
    # A server that is not serving (here: loading, as after a restart) is a lost
    # connection to redis-py, which its retry policy answers by connecting again.
    assert isinstance(subscription._reply_error("LOADING Redis is loading"), redis.ConnectionError)
    assert isinstance(
        subscription._reply_error("NOAUTH Authentication required."), redis.ConnectionError
    )
    big = "v" * 300_000  # a reply larger than one read
    direct.call(("SET", "big", big))
    assert direct.call(("GET", "big"), ("PING",)) == [big.encode(), b"PONG"]


def test_a_demoted_master_is_a_lost_connection_as_redis_py_makes_it(redis_url: str) -> None:
    # Behind Sentinel, a master that answers READONLY has been demoted: the write must
    # go again to the new master, not fail as a bad command.
    with EmbeddedRedis() as replica:
        primary_port = int(redis_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
        client = redis.Redis.from_url(replica.url)
        client.execute_command("REPLICAOF", "127.0.0.1", primary_port)
        conn = client.connection_pool.get_connection()
        conn.connection_pool = type("Pool", (), {"is_master": True})()
        with pytest.raises(redis.ConnectionError, match="replica"):
            subscription._round_trip(conn, [b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"], 1)
        assert conn._sock is None  # disconnected: the next connect asks the Sentinels
        conn.connection_pool = None
        with pytest.raises(redis.exceptions.ReadOnlyError):  # a plain server's: as redis-py
            subscription._round_trip(conn, [b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"], 1)
        client.execute_command("REPLICAOF", "NO", "ONE")


def test_a_copy_is_served_only_within_the_lease_of_redis_last_answer(
    own_redis: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A frozen Redis sends no invalidation, and a failover (Sentinel, a Cluster, an
    # endpoint that moves) may meanwhile let another server take writes: silence is
    # not "nothing changed" for longer than the lease.
    monkeypatch.setattr(subscription, "LEASE", 0.5)
    store = RedisStore.from_url(own_redis.url, timeout=0.3)
    store.create("s", {"x": b"1"})
    warm(store, "s")
    own_redis.pause()
    try:
        assert fields(store, "s") == {"x": b"1"}  # within the lease: the copy
        time.sleep(0.6)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.load("s")  # past it: Redis is asked first, and does not answer
        assert time.monotonic() - started < 1.0
        with pytest.raises(StoreUnavailable):
            store.load("s")  # the breaker is open: at once, no copy
    finally:
        own_redis.resume()
    deadline = time.monotonic() + 3
    while True:  # recovers by itself, within the breaker's probe interval
        try:
            assert fields(store, "s") == {"x": b"1"}
            break
        except StoreUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_under_traffic_heartbeats_renew_the_lease(
    redis_url: str, raw_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subscription, "LEASE", 0.4)
    monkeypatch.setattr(subscription, "HEARTBEAT", 0.1)
    store = RedisStore.from_url(redis_url)
    store.create("s", {"x": b"1"})
    warm(store, "s")
    raw_redis.config_resetstat()
    until = time.monotonic() + 1.2  # three leases long
    while time.monotonic() < until:
        assert fields(store, "s") == {"x": b"1"}
        time.sleep(0.005)
    assert calls(raw_redis, "hgetall") == 0  # every read was the copy...
    assert 6 <= calls(raw_redis, "ping") <= 13  # ...while a PING a beat kept it current


def test_a_process_that_only_writes_keeps_its_connection(
    redis_url: str, raw_redis: redis.Redis
) -> None:
    # Untracked (no subscription yet: it never read), each connection was dropped and
    # made again at the next command: a connect per write, a TLS handshake each over
    # rediss:// (found by an independent review).
    reader, writer = RedisStore.from_url(redis_url), RedisStore.from_url(redis_url)
    created = reader.create("s", {"n": b"0"}).created
    writer.save("s", Changes({"n": b"0"}, frozenset()), created=created)  # connected
    before = raw_redis.info("stats")["total_connections_received"]
    for n in range(20):
        writer.save("s", Changes({"n": str(n).encode()}, frozenset()), created=created)
    assert raw_redis.info("stats")["total_connections_received"] - before == 0
    warm(writer, "s")  # once it reads, it subscribes, and connects tracked
    later()
    reader.save("s", Changes({"n": b"x"}, frozenset()), created=created)
    later()
    assert fields(writer, "s") == {"n": b"x"}  # and hears of others' changes


class _SlowRelease:
    """A lock whose release pauses the idle drainer's thread: it then lingers, alive,
    after deciding to stop."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        if threading.current_thread().name == "statescale-invalidations":
            time.sleep(0.3)


def test_a_subscription_made_as_the_idle_drainer_stops_gets_a_drainer_of_its_own(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subscription, "IDLE_DRAIN", 0.05)
    store = RedisStore.from_url(redis_url)
    store.create("s", {"x": b"1"})
    warm(store, "s")
    tracking = store.tracking
    assert tracking is not None
    tracking._lock = _SlowRelease()  # type: ignore[assignment]
    with tracking._lock:
        tracking._drop("dropped by the test")
    time.sleep(0.2)  # the drainer has seen no subscription and lingers in the release
    warm(store, "s")  # subscribes again
    time.sleep(0.5)  # the old drainer is gone by now
    drainer = tracking._thread
    assert drainer is not None and drainer.is_alive(), "nothing drains an idle process"
    store.close()
