from __future__ import annotations

import pytest

from statescale.exceptions import ConfigError
from statescale.routing import balancers
from statescale.routing.backends import Backend
from statescale.routing.minting import owned_id_factory
from statescale.routing.ring import Ring
from statescale.signing import _ID_CHARS

BACKENDS = [Backend.parse(f"node{i}=127.0.0.1:{9000 + i}") for i in range(1, 5)]


@pytest.mark.parametrize("balancer", ["statescale", "nginx", "haproxy"])
def test_minted_ids_route_to_their_minter(balancer: str) -> None:
    ring = balancers.get(balancer).ring(BACKENDS)
    for backend in BACKENDS:
        mint = owned_id_factory(ring, backend.name)
        ids = {mint() for _ in range(200)}
        assert len(ids) == 200
        assert {ring.owner(i) for i in ids} == {backend.name}
        assert all(_ID_CHARS.match(i) and len(i) >= 43 for i in ids)  # 256-bit candidates


def test_a_stranger_cannot_mint() -> None:
    with pytest.raises(ConfigError, match="not on the ring"):
        owned_id_factory(Ring(["a", "b"]), "zzz")
