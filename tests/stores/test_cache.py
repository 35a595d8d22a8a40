"""The per-process copy that published changes keep current, on a real redis-server.

Two stores with their own clients stand for two worker processes."""

from __future__ import annotations

import time

import pytest
import redis

from statescale.embedded import EmbeddedRedis
from statescale.session import Changes
from statescale.stores import _cache
from statescale.stores.redis import RedisStore
from tests.conftest import Clock


def fields(store: RedisStore, sid: str, min_version: int = 0) -> dict[str, bytes] | None:
    record = store.load(sid, min_version=min_version)
    return None if record is None else dict(record.fields)


def later() -> None:
    """The next request: it reaches a worker after the writer has answered its client,
    so after Redis has written the change out to every subscriber (the same event-loop
    pass as the writer's reply). In one test process there is no such hop, so wait."""
    time.sleep(0.02)


def warm(store: RedisStore, sid: str) -> None:
    """Two reads: the first subscribes, the second is cached."""
    fields(store, sid)
    fields(store, sid)


def test_writes_in_one_process_are_seen_by_the_others_without_a_read(
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
        # copy older than that is served, however late the change reaches this process.
        assert fields(reader, "s", version) == {"n": str(n).encode()}
        assert fields(writer, "s", version) == {"n": str(n).encode()}
    stats = raw_redis.info("commandstats")
    # Most reads came from the copies; a read whose change had not arrived yet went to Redis.
    assert stats.get("cmdstat_hgetall", {"calls": 0})["calls"] < 100
    assert stats["cmdstat_evalsha"]["calls"] == 200
    assert "cmdstat_ping" not in stats  # a process that keeps up never has to catch up


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


def test_a_change_made_behind_statescales_back_is_seen_within_the_touch_interval(
    redis_url: str, raw_redis: redis.Redis, clock: Clock
) -> None:
    store = RedisStore.from_url(redis_url, clock=clock, idle_timeout=600)
    assert store.cache is not None
    store.create("s", {"x": b"1"})
    warm(store, "s")
    raw_redis.delete(store.key("s"))  # no delta: a FLUSHDB, an eviction, a person
    assert fields(store, "s") == {"x": b"1"}  # the copy, for now
    clock.now += store.cache.touch_interval
    assert fields(store, "s") is None


def test_idle_timeout_slides_through_the_script_when_it_runs_down(
    redis_url: str, raw_redis: redis.Redis, clock: Clock
) -> None:
    a = RedisStore.from_url(redis_url, clock=clock, idle_timeout=600, absolute_lifetime=None)
    b = RedisStore.from_url(redis_url, clock=clock, idle_timeout=600, absolute_lifetime=None)
    assert a.cache is not None
    a.create("s", {"x": b"1"})
    warm(b, "s")
    raw_redis.pexpire(a.key("s"), 100_000)  # as if 500 s had passed
    clock.now += a.cache.touch_interval + 1
    assert fields(a, "s") == {"x": b"1"}  # a miss: reads, finds the TTL low, slides it
    assert raw_redis.pttl(a.key("s")) > 590_000
    clock.now += 1
    later()
    assert fields(b, "s") == {"x": b"1"}  # b's copy followed the published expiry


def test_restart_clears_the_copies_and_changes_flow_again(own_redis: EmbeddedRedis) -> None:
    a, b = RedisStore.from_url(own_redis.url), RedisStore.from_url(own_redis.url)
    a.create("s", {"x": b"1"})
    warm(b, "s")
    own_redis.stop()
    own_redis.start()  # an empty server
    assert fields(b, "s") is None  # the old copy is not served
    created = a.create("s", {"x": b"2"}).created
    warm(b, "s")
    assert fields(b, "s") == {"x": b"2"}
    version = a.save("s", Changes({"x": b"3"}, frozenset()), created=created)
    assert fields(b, "s", version) == {"x": b"3"}


def test_an_idle_process_keeps_up_with_many_changes(redis_url: str) -> None:
    # Thousands of small changes while b serves nothing: b's background thread takes
    # them every IDLE_DRAIN seconds, and b's next read catches up with the rest.
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
    # b neither serves nor drains (no background thread) while a writes far more than
    # b's socket holds: Redis and the kernel hold the rest back until b reads, so one
    # read of the socket cannot bring b up to date. b must sync (PING) first.
    monkeypatch.setattr(_cache, "IDLE_DRAIN", 3600.0)
    a, b = RedisStore.from_url(redis_url), RedisStore.from_url(redis_url)
    created = a.create("flood", {"x": b"1"}).created
    warm(b, "flood")
    time.sleep(0.1)  # the thread started by warm() has drained once and now sleeps
    pad = b"p" * 200
    for n in range(8000):
        a.save("flood", Changes({"n": str(n).encode(), "pad": pad}, frozenset()), created=created)
    later()
    raw_redis.config_resetstat()
    assert fields(b, "flood") == {"x": b"1", "n": b"7999", "pad": pad}
    stats = raw_redis.info("commandstats")
    assert stats["cmdstat_ping"]["calls"] == 1  # b's catch-up
    assert "cmdstat_hgetall" not in stats  # ...after which its copy was current


def test_a_lost_change_drops_the_copy(redis_url: str, raw_redis: redis.Redis) -> None:
    a, b = RedisStore.from_url(redis_url), RedisStore.from_url(redis_url)
    a.create("s", {"x": b"1"})
    warm(b, "s")
    raw_redis.hincrby(a.key("s"), "\x00v", 1)  # version 2 was never published
    raw_redis.hset(a.key("s"), "x", b"2")
    created_record = a.load("s")
    assert created_record is not None
    a.save("s", Changes({"y": b"3"}, frozenset()), created=created_record.created)  # v3
    later()
    assert fields(b, "s") == {"x": b"2", "y": b"3"}  # v3 does not follow v1: re-read


def test_under_the_lock_reads_come_from_redis(redis_url: str, raw_redis: redis.Redis) -> None:
    store = RedisStore.from_url(redis_url)
    store.create("s", {"x": b"1"})
    warm(store, "s")
    raw_redis.config_resetstat()
    with store.lock("s"):
        assert fields(store, "s") == {"x": b"1"}
    assert "cmdstat_hgetall" in raw_redis.info("commandstats")
