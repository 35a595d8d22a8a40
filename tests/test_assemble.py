"""The one builder: Settings in; a store, an ID factory and a middleware out."""

from __future__ import annotations

import os

import pytest

from statescale import assemble, embedded
from statescale.config import Settings
from statescale.exceptions import ConfigError
from statescale.routing import balancers
from statescale.routing.backends import parse_backends
from statescale.stores import MemoryStore
from statescale.stores.redis import RedisStore

BACKENDS = tuple(parse_backends(["a=127.0.0.1:1", "b=127.0.0.1:2", "c=127.0.0.1:3"]))


def test_a_redis_store_without_a_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"STATESCALE_REDIS_URL.*STATESCALE_EMBEDDED_REDIS"):
        assemble.build_store(Settings())


def test_memory_and_url_stores(redis_url: str) -> None:
    assert isinstance(assemble.build_store(Settings(mode="sticky")), MemoryStore)
    store = assemble.build_store(Settings(redis_url=redis_url, local_cache=0))
    assert isinstance(store, RedisStore) and store.tracking is None and not store.per_process


def test_the_embedded_server_only_when_asked_and_private_to_its_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(embedded, "_shared", None)
    store = assemble.build_store(Settings(embedded_redis=True))
    server = embedded.shared()
    try:
        assert isinstance(store, RedisStore) and server.ping()
        assert store.per_process  # this process started it: no other process sees it
        monkeypatch.setattr(os, "getpid", lambda: server.owner_pid + 1)
        assert not store.per_process  # in a worker forked after it started: shared
        server.stop()  # a forked worker never stops the deployment's server
        monkeypatch.undo()
        assert server.ping()
    finally:
        server.stop()
    assert not server.ping()


def test_a_node_mints_ids_its_balancers_ring_routes_to_it() -> None:
    for name in balancers.names():
        settings = Settings(node="b", backends=BACKENDS, balancer=name)
        mint = assemble.build_id_factory(settings)
        ring = balancers.get(name).ring(BACKENDS)
        assert {ring.owner(mint()) for _ in range(50)} == {"b"}


def test_the_hosting_server_decides_over_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assemble, "_hosting", assemble.Hosting())
    settings = Settings(mode="sticky")
    assert assemble.hosted(settings) is settings
    assemble.host(assemble.Hosting(node="c", backends=BACKENDS))
    hosted = assemble.hosted(settings)
    assert hosted.node == "c" and hosted.backends == BACKENDS and hosted.balancer == "statescale"
    app = assemble.build_middleware(lambda e, s: [], settings, store=MemoryStore())
    ring = balancers.get("statescale").ring(BACKENDS)
    assert ring.owner(app.signer.new_id()) == "c"
