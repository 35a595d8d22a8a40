"""The breaker that fails fast while the store hangs (pure: the clock and probe are ours)."""

from __future__ import annotations

import pytest

from statescale.exceptions import StoreUnavailable
from statescale.stores.redis.breaker import Breaker
from tests.conftest import Clock


def test_closed_until_a_timeout_then_fails_fast_and_probes_on_schedule(clock: Clock) -> None:
    answers: list[bool] = []
    breaker = Breaker(lambda: answers.pop(0), interval=0.25, clock=clock)
    breaker.guard("load")  # closed: nothing asked
    breaker.tripped("TimeoutError: Timeout reading from socket")
    with pytest.raises(StoreUnavailable, match=r"not answering.*Timeout reading"):
        breaker.guard("save")  # no probe yet: at once
    clock.now += 0.25
    answers.append(False)
    with pytest.raises(StoreUnavailable):
        breaker.guard("load")  # the probe went unanswered
    assert answers == []
    with pytest.raises(StoreUnavailable):
        breaker.guard("load")  # and the next is a quarter second away
    clock.now += 0.25
    answers.append(True)
    breaker.guard("load")  # answered: closed again
    assert not breaker.open
    breaker.guard("load")


def test_while_one_thread_probes_the_others_fail_fast(clock: Clock) -> None:
    # The probe ran under the breaker's lock: with the Sentinels stalled (a probe is a
    # discovery, 0.4 s a Sentinel), 8 requests waited behind one another, the last
    # 3 to 10 s, each to fail in the end.
    import threading

    started, release = threading.Event(), threading.Event()

    def slow_probe() -> bool:
        started.set()
        release.wait(5)
        return False

    breaker = Breaker(slow_probe, interval=0.25, clock=clock)
    breaker.tripped("TimeoutError")
    clock.now += 0.25

    def probing() -> None:
        with pytest.raises(StoreUnavailable):
            breaker.guard("a")  # its probe goes unanswered

    prober = threading.Thread(target=probing)
    prober.start()
    assert started.wait(5)
    failed: list[bool] = []

    def other() -> None:
        with pytest.raises(StoreUnavailable):
            breaker.guard("b")
        failed.append(True)

    waiting = threading.Thread(target=other)
    try:
        waiting.start()
        waiting.join(2)
        assert failed == [True]  # failed while the probe still ran, not behind it
    finally:
        release.set()
        prober.join(5)
        waiting.join(5)
    clock.now += 0.1
    with pytest.raises(StoreUnavailable):
        breaker.guard("c")  # the next probe is an interval after that one ended
