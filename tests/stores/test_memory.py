from __future__ import annotations

import pytest

from statescale.exceptions import ConfigError
from statescale.session import Changes, Record
from statescale.stores import MemoryStore
from statescale.stores.memory import MAX_LEFT, UNCOUNTED, Kept
from tests.conftest import Clock


def test_idle_timeout_slides(clock: Clock) -> None:
    store = MemoryStore(idle_timeout=60, absolute_lifetime=None, clock=clock)
    store.create("s", {"a": b"1"})
    for _ in range(5):
        clock.now += 50
        assert store.load("s") is not None
    clock.now += 61
    assert store.load("s") is None


def test_evicts_least_recently_used(clock: Clock) -> None:
    store = MemoryStore(max_sessions=2, clock=clock)
    store.create("a", {})
    store.create("b", {})
    store.load("a")  # a is now the most recent
    store.create("c", {})
    assert store.load("b") is None
    assert store.load("a") is not None and store.load("c") is not None
    assert len(store) == 2


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"max_sessions": 0}, id="no-room"),
        pytest.param({"idle_timeout": 0}, id="zero-idle"),
        pytest.param({"idle_timeout": 60, "absolute_lifetime": 30}, id="absolute-below-idle"),
    ],
)
def test_bad_options_fail_at_construction(options: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        MemoryStore(**options)  # type: ignore[arg-type]


def test_one_shot_sessions_never_evict_one_whose_client_came_back(clock: Clock) -> None:
    store = MemoryStore(max_sessions=100, clock=clock)
    store.create("regular", {"a": b"1"})
    assert store.load("regular") is not None  # its client came back: protected
    for n in range(1200):  # a flood of anonymous one-shot sessions, 12x the room
        store.create(f"one-shot-{n}", {"n": b"1"})
    assert store.load("regular") is not None
    assert len(store) == 100
    assert store.load("one-shot-0") is None and store.load("one-shot-1199") is not None


def test_a_new_session_lives_the_first_lifetime_until_its_client_returns(clock: Clock) -> None:
    store = MemoryStore(idle_timeout=600, first_lifetime=60, clock=clock)
    store.create("gone", {})
    store.create("back", {})
    store.create("login", {}, replaces="back")  # a regenerated session: it came back
    clock.now += 30
    assert store.load("back") is None  # replaced
    assert store.load("login") is not None
    store.create("back", {})
    clock.now += 59
    assert store.load("back") is not None  # returned within the first lifetime
    clock.now += 61
    assert store.load("gone") is None  # never came back: 120 s > 60 s
    assert store.load("back") is not None  # now on the idle timeout
    assert store.load("login") is not None


def test_new_sessions_keep_room_when_every_slot_was_once_protected(clock: Clock) -> None:
    store = MemoryStore(max_sessions=10, clock=clock)
    for n in range(10):  # ten users who all came back
        store.create(f"regular-{n}", {})
        store.load(f"regular-{n}")
    store.create("newcomer", {})  # a new user must get a session, and keep it
    assert store.load("newcomer") is not None
    assert len(store) == 10
    assert sum(store.load(f"regular-{n}") is not None for n in range(10)) == 9


def _copy(store: MemoryStore, session_id: str) -> Kept:
    """The session as a hand-over would carry it (taken, then put back)."""
    kept = store.take(session_id)
    assert kept is not None
    assert store.put(session_id, kept)
    return kept


def test_a_late_hand_over_never_undoes_a_write(clock: Clock) -> None:
    store = MemoryStore(clock=clock)
    store.create("s", {"n": b"1"})
    stale = _copy(store, "s")  # a copy on its way here, twice (pushed, and fetched)
    store.save("s", Changes({"n": b"2"}, frozenset()), created=clock.now)
    assert not store.put("s", stale)
    assert store.load("s") == Record({"n": b"2"}, stale.record.created)


def test_a_copy_older_than_the_one_given_away_is_refused(clock: Clock) -> None:
    store = MemoryStore(clock=clock)
    store.create("s", {"n": b"1"})
    stale = _copy(store, "s")
    store.save("s", Changes({"n": b"2"}, frozenset()), created=clock.now)
    given = store.take("s")  # to another process
    assert given is not None and given.version > stale.version
    assert not store.put("s", stale) and not store.holds("s")
    assert store.superseded("s", stale) and not store.superseded("s", given)
    assert store.put("s", given)  # the same copy coming back is kept


def test_a_duplicate_of_a_copy_received_cannot_come_back_after_it_moved_on(
    clock: Clock,
) -> None:
    # A session pushed here twice (two hand-overs of one copy), given on in between
    # with no write: the second copy was as new as the one given, and was kept. A peer
    # then got that stale copy, refused it, and its user a fresh session (CI saw it).
    sender, store = MemoryStore(clock=clock), MemoryStore(clock=clock)
    sender.create("s", {"n": b"1"})
    copy = sender.take("s")
    assert copy is not None and store.put("s", copy)  # the first of the two arrives
    given = store.take("s")  # asked for by the session's user's node, unchanged
    assert given is not None and given.version > copy.version
    assert not store.put("s", copy) and not store.holds("s")  # the duplicate
    assert store.superseded("s", copy)
    assert store.put("s", given.moved())  # the session itself comes back: kept


def test_a_late_hand_over_never_revives_a_deleted_or_replaced_session(clock: Clock) -> None:
    store = MemoryStore(clock=clock)
    for session_id in ("gone", "old"):
        store.create(session_id, {"user": b"alice"})
    copies = {session_id: _copy(store, session_id) for session_id in ("gone", "old")}
    store.delete("gone")  # a logout
    store.create("new", {"user": b"alice"}, replaces="old")  # a regeneration
    for session_id, kept in copies.items():
        assert not store.put(session_id, kept) and not store.holds(session_id)


def test_a_scale_out_that_gives_many_sessions_away_keeps_the_marks_of_logouts(
    clock: Clock,
) -> None:
    store = MemoryStore(clock=clock, max_sessions=MAX_LEFT + 10)
    store.create("gone", {"user": b"alice"})
    late = _copy(store, "gone")
    store.delete("gone")  # a logout; then more sessions given away than it remembers
    for n in range(MAX_LEFT + 1):
        store.create(f"s{n}", {})
        assert store.take(f"s{n}") is not None
    assert not store.put("gone", late) and not store.holds("gone")


def test_a_copy_from_a_release_that_does_not_count_writes_is_kept_as_before(
    clock: Clock,
) -> None:
    """A rolling upgrade: the old release's copies carry no count. One that comes back
    after this store gave the session away is kept (and counted on from there); one is
    never put over a copy held here, nor over a session deleted here."""
    store = MemoryStore(clock=clock)
    store.create("s", {"n": b"1"})
    store.save("s", Changes({"n": b"2"}, frozenset()), created=clock.now)
    given = store.take("s")
    assert given is not None and given.version == 2  # one write, one move
    back = given._replace(record=Record({"n": b"3"}, given.record.created), version=UNCOUNTED)
    assert store.put("s", back) and store.load("s") == Record({"n": b"3"}, back.record.created)
    assert not store.put("s", back._replace(record=Record({"n": b"0"}, 0.0)))  # held here
    store.save("s", Changes({"n": b"4"}, frozenset()), created=clock.now)
    assert store.take("s", version=2) is None  # written since: not taken
    assert store.holds("s")
    store.delete("s")
    assert not store.put("s", back) and not store.holds("s")


def test_a_session_held_long_makes_no_other_session_wait() -> None:
    # A review: the locks were 64 stripes; a request holding its session (a slow
    # handler, or a miss asking hung peers) made 1 in 64 other sessions wait 5 s, then
    # fail. Now one lock a session, as many as are held.
    import threading

    from statescale.exceptions import LockTimeout
    from statescale.stores.memory import ProcessLocks

    locks = ProcessLocks(wait=0.2)
    holding, release = threading.Event(), threading.Event()

    def slow_request() -> None:
        with locks.lock("held"):
            holding.set()
            release.wait(5)

    thread = threading.Thread(target=slow_request)
    thread.start()
    assert holding.wait(5)
    try:
        for n in range(200):  # others, on every stripe there was: none waits
            with locks.lock(f"other-{n}"):
                pass
        with pytest.raises(LockTimeout), locks.lock("held"):
            pass  # the same session waits, as it must
    finally:
        release.set()
        thread.join()
    assert locks._locks == {}  # none left once none is held
