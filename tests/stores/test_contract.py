"""One contract, run against every store: memory, Redis on a real server, fakeredis."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from statescale.exceptions import LockTimeout
from statescale.session import Changes
from statescale.stores import Store
from tests.conftest import Clock

F = {"a": b"1", "b": b'"two"'}


def test_is_a_store(any_store: Any) -> None:
    assert isinstance(any_store, Store)


def test_unknown_id_loads_none(any_store: Any) -> None:
    assert any_store.load("nobody-0123456789abcdefghij") is None


def test_create_then_load(any_store: Any, clock: Clock) -> None:
    created = any_store.create("s1", F).created
    assert created == clock.now
    record = any_store.load("s1")
    assert record is not None
    assert dict(record.fields) == F
    assert record.created == clock.now


def test_save_writes_only_what_changed(any_store: Any) -> None:
    created = any_store.create("s1", F).created
    # Two requests, each changing a different key, applied one after the other.
    any_store.save("s1", Changes({"c": b"3"}, frozenset()), created=created)
    any_store.save("s1", Changes({}, frozenset({"a"})), created=created)
    record = any_store.load("s1")
    assert record is not None
    assert dict(record.fields) == {"b": b'"two"', "c": b"3"}


def test_create_replaces_old_record(any_store: Any) -> None:
    any_store.create("old", F)
    any_store.create("new", F, replaces="old")
    assert any_store.load("old") is None
    assert any_store.load("new") is not None


def test_delete(any_store: Any) -> None:
    any_store.create("s1", F)
    any_store.delete("s1")
    any_store.delete("never-existed")
    assert any_store.load("s1") is None


def test_absolute_lifetime_is_not_extended_by_activity(any_store: Any, clock: Clock) -> None:
    any_store.lifetime.absolute = 100.0
    any_store.lifetime.idle = 60.0
    any_store.create("s1", F)
    for _ in range(3):  # busy: a load every 30 s keeps it from idling out
        clock.now += 30
        assert any_store.load("s1") is not None
    clock.now += 30  # 120 s after creation
    assert any_store.load("s1") is None


def test_regenerated_record_keeps_its_creation_time(any_store: Any, clock: Clock) -> None:
    created = any_store.create("old", F).created
    clock.now += 10
    assert any_store.create("new", F, created=created, replaces="old").created == created
    record = any_store.load("new")
    assert record is not None and record.created == created


def test_lock_excludes_and_times_out(any_store: Any) -> None:
    any_store.lock_wait = 0.2
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with any_store.lock("s1"):
            held.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    try:
        with pytest.raises(LockTimeout), any_store.lock("s1"):
            pass
    finally:
        release.set()
        thread.join()
    with any_store.lock("s1"):  # free again
        pass


def test_a_lock_taken_on_one_thread_is_released_on_another(any_store: Any) -> None:
    # The middleware releases where the response starts; Flask runs an async view on
    # asgiref's thread, which took it. Redis's lock kept its token per thread, so the
    # release raised and the lock stayed for its whole expiry.
    any_store.lock_wait = 0.2
    lock = any_store.lock("s1")
    taker = threading.Thread(target=lock.__enter__)
    taker.start()
    taker.join()
    lock.__exit__(None, None, None)
    with any_store.lock("s1"):  # free again at once
        pass
