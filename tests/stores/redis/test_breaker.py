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
