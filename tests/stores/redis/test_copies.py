"""The versioned copy table, alone: no Redis, a hand-moved clock."""

from __future__ import annotations

from statescale.session import Changes, Record
from statescale.stores.redis.copies import Copies
from tests.conftest import Clock

REC = Record({"a": b"1"}, 100.0)


def table(clock: Clock, size: int = 10) -> Copies:
    return Copies(max_entries=size, touch_interval=10.0, clock=clock)


def kept(copies: Copies, key: str = "k", version: int = 3) -> None:
    copies.read(key, copies.begin(key), REC, version, 60_000)


def test_a_read_is_kept_and_served_until_invalidated(clock: Clock) -> None:
    copies = table(clock)
    kept(copies)
    assert copies.get("k") == REC
    copies.invalidate(["k"])
    assert copies.get("k") is None


def test_a_read_overtaken_by_an_invalidation_is_not_kept(clock: Clock) -> None:
    copies = table(clock)
    token = copies.begin("k")
    copies.invalidate(["k"])  # arrived while the read was in flight
    copies.read("k", token, REC, 3, 60_000)
    assert copies.get("k") is None


def test_an_invalidation_before_the_read_began_does_not_spoil_it(clock: Clock) -> None:
    copies = table(clock)
    other = copies.begin("k")  # a concurrent read that was overtaken...
    copies.invalidate(["k"])
    token = copies.begin("k")  # ...and one sent after the invalidation
    copies.read("k", token, REC, 3, 60_000)
    assert copies.get("k") == REC
    copies.read("k", other, REC, 2, 60_000)
    assert copies.get("k") is None


def test_invalidating_everything_spoils_every_read_in_flight(clock: Clock) -> None:
    copies = table(clock)
    kept(copies, "x")
    token = copies.begin("k")
    copies.invalidate(None)
    copies.read("k", token, REC, 3, 60_000)
    assert copies.get("k") is None and copies.get("x") is None


def test_a_copy_older_than_the_clients_last_write_is_not_served(clock: Clock) -> None:
    copies = table(clock)
    kept(copies, version=3)
    assert copies.get("k", min_version=3) == REC
    assert copies.get("k", min_version=4) is None


def test_own_writes_apply_only_on_top_of_the_version_before(clock: Clock) -> None:
    copies = table(clock)
    kept(copies, version=3)
    copies.wrote("k", copies.begin("k"), Changes({"b": b"2"}, frozenset({"a"})), 4, 60_000)
    assert copies.get("k", 4) == Record({"b": b"2"}, 100.0)
    copies.wrote("k", copies.begin("k"), Changes({"c": b"3"}, frozenset()), 6, 60_000)
    assert copies.get("k") is None  # version 5 was someone else's


def test_copies_are_read_again_after_the_touch_interval_or_expiry(clock: Clock) -> None:
    copies = table(clock)
    copies.read("k", copies.begin("k"), REC, 1, 5_000)
    assert copies.get("k") == REC
    clock.now += 5  # Redis's expiry comes first here
    assert copies.get("k") is None
    kept(copies)
    clock.now += 10
    assert copies.get("k") is None


def test_least_recently_used_goes_first(clock: Clock) -> None:
    copies = table(clock, size=2)
    kept(copies, "a")
    kept(copies, "b")
    copies.get("a")
    kept(copies, "c")
    assert len(copies) == 2 and copies.get("b") is None and copies.get("a") == REC


def test_a_fork_forgets_reads_in_flight(clock: Clock) -> None:
    copies = table(clock)
    kept(copies)
    token = copies.begin("x")
    copies.forget_all()
    assert copies.get("k") is None
    copies.begin("x")  # the child's own read of it
    copies.read("x", token, REC, 1, 60_000)
    assert copies.get("x") is None


def test_a_write_of_this_process_spoils_the_reads_in_flight_beside_it(clock: Clock) -> None:
    # Redis does not tell a connection of its own writes (NOLOOP): a read in flight on
    # the connection a write then went out on would hold a reply from before the write,
    # which no invalidation follows. The write itself spoils it.
    copies = table(clock)
    reading = copies.begin("k")
    writing = copies.begin("k")
    copies.wrote("k", writing, Changes({"a": b"2"}, frozenset()), 4, 60_000)
    copies.read("k", reading, REC, 3, 60_000)
    assert copies.get("k") is None
    after = copies.begin("k")  # a read sent after the write is kept
    copies.read("k", after, Record({"a": b"2"}, 100.0), 4, 60_000)
    assert copies.get("k", 4) == Record({"a": b"2"}, 100.0)


def test_a_failed_or_created_write_spoils_the_reads_in_flight_too(clock: Clock) -> None:
    copies = table(clock)
    reading = copies.begin("k")
    copies.read("k", copies.begin("k"), None, 0, 0, wrote=True)  # a write that failed
    copies.read("k", reading, REC, 3, 60_000)
    assert copies.get("k") is None
    reading = copies.begin("k")
    copies.read("k", copies.begin("k"), REC, 5, 60_000, wrote=True)  # a create
    copies.read("k", reading, REC, 4, 60_000)
    assert copies.get("k") is None


def test_a_read_never_replaces_a_newer_copy(clock: Clock) -> None:
    copies = table(clock)
    old = copies.begin("k")
    kept(copies, version=5)
    copies.read("k", old, Record({"a": b"0"}, 100.0), 4, 60_000)
    assert copies.get("k", 5) == REC


def test_a_read_whose_table_was_forgotten_meanwhile_is_not_kept(clock: Clock) -> None:
    copies = table(clock)
    token = copies.begin("k")
    copies.forget_all()  # a fork noticed between the read's start and its end
    copies.read("k", token, REC, 3, 60_000)
    copies.wrote("k", token, Changes({"a": b"2"}, frozenset()), 4, 60_000)
    assert copies.get("k") is None
