from __future__ import annotations

import pytest

from statescale.exceptions import ConfigError
from statescale.stores import MemoryStore
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
