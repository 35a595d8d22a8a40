from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from statescale.exceptions import SerializationError, SessionError, SessionTooLarge
from statescale.session import Record, Session, encode_value


def loaded(fields: dict[str, Any], max_size: int = 65536) -> Session:
    raw = {k: encode_value(k, v) for k, v in fields.items()}
    return Session("sid-0123456789012345678901", lambda _sid: Record(raw, 1.0), max_size=max_size)


def test_nothing_is_loaded_until_looked_at() -> None:
    calls: list[str] = []
    session = Session("sid", lambda sid: calls.append(sid) or None, max_size=100)  # type: ignore[func-returns-value]
    assert calls == [] and not session.accessed
    assert session.plan().create is None and session.plan().cookie is None
    assert "x" not in session
    assert calls == ["sid"]


def test_tracks_set_and_deleted_keys() -> None:
    session = loaded({"a": 1, "b": 2, "c": 3})
    session["a"] = 10
    del session["b"]
    changes = session.changes()
    assert dict(changes.set) == {"a": b"10"}
    assert changes.deleted == {"b"}


def test_in_place_changes_of_dicts_and_lists_are_noticed() -> None:
    session = loaded({"cart": [1], "prefs": {"x": 1}, "n": 1})
    session["cart"].append(2)
    _ = session["prefs"]  # read, unchanged: not written
    assert dict(session.changes().set) == {"cart": b"[1,2]"}


def test_unserializable_value_names_the_key_and_changes_nothing() -> None:
    session = loaded({"a": 1})
    with pytest.raises(SerializationError, match="'when'") as info:
        session["when"] = object()
    assert info.value.key == "when"
    assert "when" not in session and not session.modified


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(1, id="int"),
        pytest.param("\x00created", id="reserved"),
        pytest.param("a\x00b", id="nul-inside"),
    ],
)
def test_bad_keys(key: Any) -> None:
    with pytest.raises(SessionError):
        loaded({})[key] = 1


def test_size_limit() -> None:
    session = loaded({"a": "x"}, max_size=100)
    with pytest.raises(SessionTooLarge) as info:
        session["big"] = "y" * 200
    assert info.value.key == "big" and "big" not in session
    session["small"] = "y"  # still usable


def test_plan_for_a_new_session_creates_with_a_cookie() -> None:
    session = Session(None, lambda _sid: None, max_size=1000)
    session["a"] = 1
    plan = session.plan()
    assert plan.create == {"a": b"1"} and plan.cookie == "set" and plan.drop is None


def test_unknown_id_is_never_adopted() -> None:
    session = Session("unknown", lambda _sid: None, max_size=1000)
    assert session.new and session.id is None
    session["a"] = 1
    plan = session.plan()
    assert plan.create is not None and plan.drop is None  # created under a new ID


def test_regenerate_moves_the_data_and_drops_the_old_id() -> None:
    session = loaded({"a": 1})
    old = session.id
    session.regenerate()
    plan = session.plan()
    assert plan.create == {"a": b"1"} and plan.drop == old and plan.cookie == "set"


def test_invalidate_drops_and_clears() -> None:
    session = loaded({"a": 1})
    old = session.id
    session.invalidate()
    assert len(session) == 0 and session.new
    assert session.plan() == (None, None, None, old, "clear")


def test_corrupt_record_is_dropped() -> None:
    session = Session("sid", lambda _sid: Record({"a": b"\x80garbage"}, 1.0), max_size=1000)
    assert dict(session) == {}
    assert session.plan().drop == "sid"


values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(
    st.dictionaries(
        st.text(min_size=1).filter(lambda k: "\x00" not in k), values, min_size=1, max_size=8
    )
)
def test_what_is_written_reads_back(data: dict[str, Any]) -> None:
    session = Session(None, lambda _sid: None, max_size=1 << 20)
    session.update(data)
    plan = session.plan()
    assert plan.create is not None
    reloaded = Session("sid", lambda _sid: Record(plan.create or {}, 1.0), max_size=1 << 20)
    assert dict(reloaded) == data


def test_asking_for_the_changes_twice_gives_the_same_answer() -> None:
    # Flask's save_session asks first (what cannot be stored fails there), the
    # middleware then: an in-place change of a loaded value was found only once.
    session = loaded({"cart": ["a"]})
    session["cart"].append("b")
    first = session.changes()
    assert session.changes() == first and first.set == {"cart": b'["a","b"]'}


def test_after_the_save_marking_the_session_modified_is_refused() -> None:
    session = loaded({"cart": ["a"]})
    session.close()
    with pytest.raises(SessionError):
        session.modified = True


def test_an_abandoned_session_saves_nothing() -> None:
    session = loaded({"n": 1})
    session["n"] = 2
    session.abandon()
    assert not session.changes() and session.plan().update is None
    with pytest.raises(SessionError):
        session["n"] = 3


def test_a_copy_holds_the_values_as_they_are_now() -> None:
    # It decoded what was loaded: a value changed in place before was copied stale.
    session = loaded({"cart": ["a"]})
    session["cart"].append("b")
    snapshot = session.copy()
    assert snapshot == {"cart": ["a", "b"]}
    snapshot["cart"].append("c")  # a copy: the session is untouched
    assert session["cart"] == ["a", "b"]
