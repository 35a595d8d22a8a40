"""Shared fixtures: throwaway redis-servers on free loopback ports, never the machine's."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from statescale.embedded import EmbeddedRedis
from statescale.stores import MemoryStore
from statescale.stores.redis import RedisStore, client_from_url

SECRET = "test-secret-key-0123456789abcdef"
OLD_SECRET = "old-secret-key-0123456789abcdef"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """One private redis-server for the whole run; tests that stop or pause a server
    use ``own_redis`` instead."""
    with EmbeddedRedis() as server:
        yield server
        # Stores still alive would each log that their subscription closed: expected.
        logging.getLogger("statescale").setLevel(logging.ERROR)


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> Iterator[str]:
    yield redis_server.url
    redis.Redis.from_url(redis_server.url).flushdb()  # our own throwaway server


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A private server this test may stop, pause (SIGSTOP), kill and restart."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def raw_redis(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


class Counting:
    """Wraps a store and counts the calls that reach it."""

    def __init__(self, store: Any) -> None:
        self.inner = store
        self.calls: list[str] = []
        self.name = store.name
        self.per_process = store.per_process

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    # Defined on the class: the Store protocol check looks there.
    def load(self, *a: Any, **k: Any) -> Any:
        self.calls.append("load")
        return self.inner.load(*a, **k)

    def save(self, *a: Any, **k: Any) -> Any:
        self.calls.append("save")
        return self.inner.save(*a, **k)

    def create(self, *a: Any, **k: Any) -> Any:
        self.calls.append("create")
        return self.inner.create(*a, **k)

    def delete(self, *a: Any, **k: Any) -> Any:
        self.calls.append("delete")
        return self.inner.delete(*a, **k)

    def lock(self, *a: Any, **k: Any) -> Any:
        self.calls.append("lock")
        return self.inner.lock(*a, **k)


def make_store(kind: str, clock: Clock, redis_url: str | None = None, **options: Any) -> Any:
    if kind == "memory":
        return MemoryStore(clock=clock, **options)
    if kind == "fakeredis":
        import fakeredis

        return RedisStore(fakeredis.FakeRedis(), clock=clock, **options)
    assert redis_url is not None
    if kind == "redis-copies":  # this process's copies, which Redis keeps current
        return RedisStore(client_from_url(redis_url), clock=clock, local_cache=1000, **options)
    return RedisStore(client_from_url(redis_url), clock=clock, **options)


STORE_KINDS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis-real"),
    pytest.param("redis-copies", id="redis-copies"),
    pytest.param("fakeredis", id="fakeredis"),
]


@pytest.fixture(params=STORE_KINDS)
def any_store(request: pytest.FixtureRequest, clock: Clock) -> Any:
    url = request.getfixturevalue("redis_url") if request.param.startswith("redis") else None
    return make_store(request.param, clock, url)
