"""Peer-to-peer balancing: httpx clients with StickyTransport against registered nodes
and no balancer at all."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import pytest

from benchmarks.rig.harness import registered_node
from statescale.client import AsyncStickyTransport, StickyTransport
from statescale.exceptions import ConfigError
from statescale.processes import free_port

pytestmark = pytest.mark.integration


def _increments(transport: httpx.BaseTransport, times: int) -> tuple[list[int], set[int]]:
    values, pids = [], set()
    with httpx.Client(transport=transport, base_url="http://statescale") as client:
        for _ in range(times):
            body = client.post("/api/incr?key=p").raise_for_status().json()
            values.append(body["value"])
            pids.add(body["pid"])
    return values, pids


def test_twenty_clients_reach_their_sessions_owners_directly(redis_url: str) -> None:
    registry = f"{redis_url}?prefix=p2p-{time.monotonic_ns()}"
    with ExitStack() as stack:
        nodes = [registered_node(stack, registry, f"node{i}", workers=2) for i in (1, 2, 3)]
        transports = [StickyTransport(registry=registry) for _ in range(20)]
        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(lambda t: _increments(t, 20), transports))
        for transport in transports:
            transport.close()
        served = set().union(*(pids for _, pids in results))
        assert all(served & n.worker_pids() for n in nodes)  # spread over the nodes
    assert [values for values, _ in results] == [list(range(1, 21))] * 20
    assert all(len(pids) == 1 for _, pids in results)  # one worker served each session


def test_a_refused_connection_goes_to_the_next_owner(redis_url: str) -> None:
    """A fixed list with a node that is not there: sessions it would own go on to the
    next owner, which minted them anyway (its own ring knows no such node)."""
    registry = f"{redis_url}?prefix=p2p-dead-{time.monotonic_ns()}"
    with ExitStack() as stack:
        node = registered_node(stack, registry, "live")
        dead = f"dead=127.0.0.1:{free_port()}"
        transport = StickyTransport(backends=[f"live=127.0.0.1:{node.port}", dead])
        runs = [_increments(transport, 10)[0] for _ in range(6)]
        transport.close()
    assert runs == [list(range(1, 11))] * 6


def test_the_async_transport_routes_the_same(redis_url: str) -> None:
    registry = f"{redis_url}?prefix=p2p-async-{time.monotonic_ns()}"

    async def user() -> list[int]:
        transport = AsyncStickyTransport(registry=registry)
        async with httpx.AsyncClient(transport=transport, base_url="http://statescale") as c:
            return [(await c.post("/api/incr?key=a")).json()["value"] for _ in range(10)]

    with ExitStack() as stack:
        for i in (1, 2):
            registered_node(stack, registry, f"node{i}")

        async def users() -> list[list[int]]:
            return list(await asyncio.gather(*(user() for _ in range(5))))

        assert asyncio.run(users()) == [list(range(1, 11))] * 5


def test_the_transport_says_what_it_needs() -> None:
    with pytest.raises(ConfigError, match="registry=URL or backends"):
        StickyTransport()
    with pytest.raises(ConfigError, match="NAME=HOST:PORT"):
        StickyTransport(backends=["nonsense"])


def test_the_client_routes_by_the_cookie_value_the_routers_route_by() -> None:
    # An independent review: junk under the cookie's name before the signed value sent
    # the request to the junk's node, where the session started afresh.
    from statescale.routing.router.proxy import cookie_value as routers

    transport = StickyTransport(backends=["a=127.0.0.1:1", "b=127.0.0.1:2", "c=127.0.0.1:3"])
    header = "statescale=junk1; statescale=ID1xxxxxxxxxxxxxxxxxxxx.SIGsigsig"
    request = httpx.Request("GET", "http://app/", headers={"Cookie": header})
    routed = routers(header.encode(), b"statescale")
    assert routed is not None
    assert transport.routes._session(request) == routed.partition(".")[0]
    transport.close()
