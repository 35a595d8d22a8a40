"""RedisStore on a real redis-server: keys, round trips, corrupt data, outages."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from benchmarks.rig.sentinel import SERVICE, sentinel
from statescale.embedded import EmbeddedRedis
from statescale.exceptions import ConfigError, StoreUnavailable
from statescale.session import Changes
from statescale.stores.redis import RedisStore, client_from_url


def test_key_is_a_hash_of_the_id_with_a_cluster_hash_tag(
    redis_url: str, raw_redis: redis.Redis
) -> None:
    store = RedisStore.from_url(redis_url)
    store.create("the-session-id-0123456789", {"a": b"1"})
    (key,) = raw_redis.keys("*")
    assert b"the-session-id" not in key
    assert key.startswith(b"statescale:{") and key.endswith(b"}")


def test_ttls_idle_and_absolute(redis_url: str, raw_redis: redis.Redis) -> None:
    store = RedisStore.from_url(redis_url, idle_timeout=60, absolute_lifetime=3600, local_cache=0)
    store.create("s", {"a": b"1"}, created=time.time() - 3590)  # 10 s of life left
    assert 0 < raw_redis.pttl(store.key("s")) <= 10_000
    store.create("t", {"a": b"1"})
    raw_redis.pexpire(store.key("t"), 5_000)
    store.load("t")  # a load slides the idle timeout back to 60 s
    assert 55_000 < raw_redis.pttl(store.key("t")) <= 60_000


def test_load_is_one_round_trip_of_two_commands(redis_url: str, raw_redis: redis.Redis) -> None:
    store = RedisStore.from_url(redis_url, local_cache=0)
    store.create("s", {"a": b"1"})
    raw_redis.config_resetstat()
    store.load("s")
    stats = raw_redis.info("commandstats")
    ours = {
        k: v["calls"]
        for k, v in stats.items()
        if not k.startswith(("cmdstat_config", "cmdstat_info"))
    }
    assert ours == {"cmdstat_hgetall": 1, "cmdstat_pexpire": 1}


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({b"a": b"\xff\xfe garbage"}, id="garbage-bytes"),
        pytest.param({b"a": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94."}, id="pickle"),
        pytest.param({b"\xff": b"1"}, id="non-utf8-field-name"),
    ],
)
def test_corrupt_hash_fields_never_unpickled(
    redis_url: str, raw_redis: redis.Redis, fields: dict[bytes, bytes]
) -> None:
    from statescale.session import Session

    store = RedisStore.from_url(redis_url)
    store.create("s", {})
    raw_redis.hset(store.key("s"), mapping=fields)
    session = Session("s", store.load, max_size=65536)
    assert dict(session) == {}
    assert session.new


def test_a_key_of_the_wrong_type_is_dropped(redis_url: str, raw_redis: redis.Redis) -> None:
    store = RedisStore.from_url(redis_url)
    raw_redis.set(store.key("s"), b"an old format")
    assert store.load("s") is None
    assert not raw_redis.exists(store.key("s"))


def test_redis_down_is_store_unavailable_fast(own_redis: EmbeddedRedis) -> None:
    store = RedisStore.from_url(own_redis.url)
    own_redis.stop()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="ConnectionError"):
        store.load("s")
    assert time.monotonic() - started < 1.5


def test_redis_hung_fails_within_budget_then_recovers(own_redis: EmbeddedRedis) -> None:
    store = RedisStore.from_url(own_redis.url, timeout=0.3, local_cache=0)
    store.create("s", {"a": b"1"})
    own_redis.pause()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="Timeout"):
            store.load("s")
        assert time.monotonic() - started < 1.5
    finally:
        own_redis.resume()
    time.sleep(store.breaker.interval)  # the next probe finds it back
    assert store.load("s") is not None


def test_a_save_on_a_hung_redis_fails_within_budget_then_recovers(
    own_redis: EmbeddedRedis,
) -> None:
    store = RedisStore.from_url(own_redis.url, timeout=0.3)
    created = store.create("s", {"a": b"1"}).created
    own_redis.pause()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="Timeout"):
            store.save("s", Changes({"a": b"2"}, frozenset()), created=created)
        assert time.monotonic() - started < 1.5
    finally:
        own_redis.resume()
    time.sleep(store.breaker.interval)  # the next probe finds it back
    store.save("s", Changes({"a": b"3"}, frozenset()), created=created)
    record = store.load("s")
    assert record is not None and dict(record.fields) == {"a": b"3"}


def test_a_write_connection_killed_in_between_is_replaced_unseen(
    own_redis: EmbeddedRedis,
) -> None:
    store = RedisStore.from_url(own_redis.url, local_cache=0)
    created = store.create("s", {"a": b"1"}).created
    admin = redis.Redis.from_url(own_redis.url)
    admin.client_kill_filter(_type="normal", skipme=True)  # the store's connections
    store.save("s", Changes({"a": b"2"}, frozenset()), created=created)  # retried once
    assert admin.hget(store.key("s"), "a") == b"2"


def test_failed_commit_leaves_old_or_new_never_a_mix(own_redis: EmbeddedRedis) -> None:
    store = RedisStore.from_url(own_redis.url)
    created = store.create("s", {"a": b"1", "b": b"2"}).created
    own_redis.stop()
    with pytest.raises(StoreUnavailable):
        store.save("s", Changes({"a": b"10"}, frozenset({"b"})), created=created)
    own_redis.start()  # a fresh, empty server: "old" here is nothing at all
    assert store.load("s") is None


def test_thousands_of_fields_are_written_whole(redis_url: str, raw_redis: redis.Redis) -> None:
    # The script hands fields to Redis in batches: one unpack() of them all overflows
    # Lua's stack (8,000 values) after the deletes have run, which left half a write.
    store = RedisStore.from_url(redis_url)
    many = {f"k{n}": b"1" for n in range(5000)}
    created = store.create("s", {"gone": b"x", **many}).created
    assert len(raw_redis.hkeys(store.key("s"))) == 5003  # the fields, created, version
    changes = Changes({f"k{n}": b"2" for n in range(4500)}, frozenset({"gone", "k4999"}))
    assert store.save("s", changes, created=created) == 2
    stored = raw_redis.hgetall(store.key("s"))
    assert b"gone" not in stored and b"k4999" not in stored
    assert stored[b"k0"] == stored[b"k4499"] == b"2" and stored[b"k4500"] == b"1"


def test_save_is_one_script_call_that_sends_nothing_to_anyone_else(
    redis_url: str, raw_redis: redis.Redis
) -> None:
    store = RedisStore.from_url(redis_url, local_cache=0)
    created = store.create("s", {"a": b"1", "b": b"2"}).created
    raw_redis.config_resetstat()
    store.save("s", Changes({"a": b"10"}, frozenset({"b"})), created=created)
    stats = raw_redis.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1  # one round trip
    assert {"cmdstat_hset", "cmdstat_hdel", "cmdstat_hincrby"} <= set(stats)
    assert "cmdstat_publish" not in stats  # Redis tells only the copies' holders
    assert "cmdstat_multi" not in stats  # the script is the transaction


def test_scripts_survive_script_flush(redis_url: str, raw_redis: redis.Redis) -> None:
    store = RedisStore.from_url(redis_url)
    created = store.create("s", {"a": b"1"}).created
    raw_redis.script_flush()
    store.save("s", Changes({"a": b"2"}, frozenset()), created=created)  # NOSCRIPT handled
    record = store.load("s")
    assert record is not None and dict(record.fields) == {"a": b"2"}


def test_saving_a_vanished_record_does_not_resurrect_it(
    redis_url: str, raw_redis: redis.Redis
) -> None:
    store = RedisStore.from_url(redis_url)
    created = store.create("s", {"a": b"1"}).created
    raw_redis.delete(store.key("s"))
    store.save("s", Changes({"a": b"2"}, frozenset()), created=created)
    assert not raw_redis.exists(store.key("s"))


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        pytest.param("redis://127.0.0.1:1/0", "Redis", id="redis"),
        pytest.param("rediss://127.0.0.1:1/0", "Redis", id="rediss"),
        pytest.param("unix:///tmp/nowhere.sock", "Redis", id="unix"),
        pytest.param("redis+sentinel://127.0.0.1:1,127.0.0.1:2/mymaster/0", "Redis", id="sentinel"),
        pytest.param("redis+cluster://127.0.0.1:1,127.0.0.1:2", "LazyCluster", id="cluster"),
    ],
)
def test_urls_make_clients_without_connecting(url: str, kind: str) -> None:
    client = client_from_url(url)
    assert type(client).__name__ == kind


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://localhost", id="http"),
        pytest.param("redis+sentinel://127.0.0.1:26379", id="sentinel-without-service"),
    ],
)
def test_bad_urls_say_what_to_change(url: str) -> None:
    with pytest.raises(ConfigError):
        client_from_url(url)


def test_sentinel_url_finds_the_master(own_redis: EmbeddedRedis, tmp_path: Path) -> None:
    """A real redis-sentinel watching a real master."""
    with sentinel(own_redis, tmp_path) as watched:
        port = watched.port
        deadline = time.monotonic() + 10
        store = RedisStore.from_url(f"redis+sentinel://127.0.0.1:{port}/{SERVICE}/0")
        while True:
            try:
                store.create("s", {"a": b"1"})
                break
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        store.load("s")  # the first read subscribes; the next is kept as a copy
        assert store.tracking is not None  # Sentinel's master keeps copies too
        record = store.load("s")
        assert record is not None and dict(record.fields) == {"a": b"1"}
        assert len(store.tracking.copies) == 1
        direct = redis.Redis(port=own_redis.port)
        direct.hset(store.key("s"), "a", b"2")  # another client's write...
        time.sleep(0.02)
        record = store.load("s")  # ...reached this process's copy through the master
        assert record is not None and dict(record.fields) == {"a": b"2"}
        store.save("s", Changes({"b": b"3"}, frozenset()), created=record.created)
        assert direct.hgetall(store.key("s"))[b"b"] == b"3"  # written to the master


@pytest.mark.parametrize("cache", [10_000, 0], ids=["local-cache", "no-cache"])
def test_a_new_session_gets_the_first_lifetime_until_its_client_returns(
    redis_url: str, raw_redis: redis.Redis, cache: int
) -> None:
    store = RedisStore.from_url(redis_url, local_cache=cache, idle_timeout=1800, first_lifetime=120)
    store.create("one-shot", {"a": b"1"})
    store.create("back", {"a": b"1"})
    store.create("login", {"a": b"1"}, replaces="back")  # regenerated: it came back
    assert 0 < raw_redis.pttl(store.key("one-shot")) <= 120_000
    assert raw_redis.pttl(store.key("login")) > 1_700_000
    store.create("back", {"a": b"1"})
    assert store.load("back") is not None  # the client returns with its cookie
    assert raw_redis.pttl(store.key("back")) > 1_700_000
    assert raw_redis.pttl(store.key("one-shot")) <= 120_000


def test_a_client_built_by_hand_keeps_copies(redis_url: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(redis_url)
    store = RedisStore(redis.Redis(host=parts.hostname, port=parts.port), local_cache=100)
    store.create("s", {"a": b"1"}, replaces="old")
    store.load("s")
    assert store.load("s") == store.load("s") and store.tracking is not None
    assert len(store.tracking.copies) == 1


def test_a_timed_out_reply_is_never_read_as_the_next_ones(own_redis: EmbeddedRedis) -> None:
    store = RedisStore.from_url(own_redis.url, timeout=0.2, local_cache=0)
    for name in ("alice", "bob"):
        store.create(name, {"who": name.encode()}, replaces="x")
    admin = redis.Redis.from_url(own_redis.url)
    admin.client_pause(400)  # the next read times out; its reply comes later
    with pytest.raises(StoreUnavailable):
        store.load("alice")
    time.sleep(0.5)  # the breaker's probe is due again
    record = store.load("bob")
    assert record is not None and dict(record.fields) == {"who": b"bob"}


def test_a_write_between_a_read_and_its_slide_leaves_no_stale_copy(redis_url: str) -> None:
    """A copy takes the version of the slide (touch) write only if nothing was written
    in between: this process's own write would not come back as an invalidation."""
    store = RedisStore.from_url(redis_url, local_cache=100)
    written = store.create("sid", {"a": b"1"})  # first lifetime: the next load slides
    read = store._read
    versions = []

    def read_then_write(key: str, second: object, via: object = None) -> object:
        out = read(key, second, via)  # type: ignore[arg-type]
        store._read = read  # type: ignore[method-assign]
        versions.append(
            store.save("sid", Changes({"a": b"2"}, frozenset()), created=written.created)
        )
        return out

    store._read = read_then_write  # type: ignore[method-assign]
    store.load("sid")
    record = store.load("sid", min_version=versions[0])
    assert record is not None and dict(record.fields) == {"a": b"2"}


def test_a_frozen_master_replaced_by_sentinel_stops_its_copies(tmp_path: Path) -> None:
    """A master frozen (SIGSTOP) and replaced by its replica, promoted by a real
    sentinel: its subscription only falls silent, and another process writes to the new
    master. Copies held from the frozen one are not served once their lease has run out
    (the change is never heard of): from the moment the write is acknowledged, every
    read answers it or 503, never the old value. (Measured before the lease: the old
    value for 7.7 s after the write.)"""
    with EmbeddedRedis() as master, EmbeddedRedis() as replica:
        redis.Redis(port=replica.port).replicaof("127.0.0.1", master.port)
        with sentinel(master, tmp_path, down_after_ms=1000) as watched:
            port = watched.port
            watched.wait_for_replica()
            url = f"redis+sentinel://127.0.0.1:{port}/{SERVICE}/0"
            holder, writer = RedisStore.from_url(url), RedisStore.from_url(url)
            created = holder.create("s", {"n": b"1"}).created
            for _ in range(3):  # the first read subscribes; the next ones are the copy
                record = holder.load("s")
                assert record is not None and record.fields == {"n": b"1"}
            assert holder.tracking is not None and len(holder.tracking.copies) == 1
            deadline = time.monotonic() + 10
            while redis.Redis(port=replica.port).hget(holder.key("s"), "n") != b"1":
                assert time.monotonic() < deadline, "the replica never had the session"
                time.sleep(0.05)
            master.pause()
            deadline = time.monotonic() + 30
            try:
                while True:  # the writer's first answer comes from the promoted replica
                    assert time.monotonic() < deadline, "no failover"
                    try:
                        writer.save("s", Changes({"n": b"2"}, frozenset()), created=created)
                        break
                    except StoreUnavailable:
                        time.sleep(0.05)
                seen = set()
                until = time.monotonic() + 1.5
                while time.monotonic() < until:
                    try:
                        record = holder.load("s")
                        seen.add(None if record is None else record.fields["n"])
                    except StoreUnavailable:
                        seen.add("503")
                    time.sleep(0.02)
            finally:
                master.resume()
    assert b"1" not in seen and b"2" in seen, seen


def test_no_master_found_fails_fast_after_the_first(tmp_path: Path) -> None:
    """The master gone and its Sentinel stalled: each request waited on the Sentinel's
    timeouts, 1.7 s apiece (measured), to fail in the end. The first still does; the
    breaker then fails the others at once, and the store recovers by itself."""
    with EmbeddedRedis() as master, sentinel(master, tmp_path) as watched:
        store = RedisStore.from_url(
            f"redis+sentinel://127.0.0.1:{watched.port}/{SERVICE}/0", local_cache=0
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                store.create("s", {"a": b"1"})
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        master.stop()
        watched.pause()
        with pytest.raises(StoreUnavailable, match="MasterNotFoundError"):
            store.load("s")
        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                store.load("s")
            assert time.monotonic() - started < 0.1
        watched.resume()
        master.start()  # the same port: the Sentinel's master again, emptied
        deadline = time.monotonic() + 10
        while True:
            try:
                assert store.load("s") is None  # answered: it kept nothing on disk
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.1)
