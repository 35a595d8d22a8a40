"""Sticky nodes behind statescale's router hand sessions over when the ring changes:
a node that joins fetches its sessions from their previous owner, and a node taken out
gives its sessions to their next owners (while it still runs, and when it stops)."""

from __future__ import annotations

import signal
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from benchmarks.rig.harness import (
    ADMIN_TOKEN,
    Load,
    SessionClient,
    add_sticky_node,
    start_balancer,
    start_router,
    sticky_nodes,
    wait_serving,
)
from statescale.processes import free_port, stop_process
from statescale.routing.balancers import get as get_balancer
from statescale.signing import routing_key

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
THREADED = ("--threads", "4")


def _router(stack: ExitStack, backends: list, port: int, admin: int) -> None:  # type: ignore[type-arg]
    proc = start_router(backends, port, "--admin", f"127.0.0.1:{admin}")
    stack.callback(stop_process, proc, 15)
    wait_serving(port, proc)


def _owners(load: Load, backends: list) -> set[str]:  # type: ignore[type-arg]
    """The nodes ``backends``' ring gives the users' sessions (the routers' view)."""
    ring = get_balancer("statescale").ring(backends)
    return {ring.owner(routing_key(c.cookie)) for c in load.clients if c.cookie}


def test_a_node_that_joins_takes_its_sessions_over() -> None:
    port, admin = free_port(), free_port()
    with ExitStack() as stack:
        _, backends = sticky_nodes(stack)
        _router(stack, backends, port, admin)
        with Load(port, users=20) as load:
            time.sleep(1.0)
            _, new = add_sticky_node(stack, backends)
            reply = SessionClient(admin).post(
                f"/nodes?name={new.name}&addr={new.address}", headers=AUTH
            )
            assert reply.status == 200
            time.sleep(1.5)
    assert new.name in _owners(load, [*backends, new])  # some users' sessions moved...
    assert load.failures == [], load.failures[:5]
    assert load.wrong() == []  # ...and none of them started afresh


def test_a_node_taken_out_gives_its_sessions_to_their_next_owners() -> None:
    port, admin = free_port(), free_port()
    with ExitStack() as stack:
        nodes, backends = sticky_nodes(stack)
        _router(stack, backends, port, admin)
        with Load(port, users=20) as load:
            time.sleep(1.0)
            reply = SessionClient(admin).request("DELETE", "/nodes?name=node1", headers=AUTH)
            assert reply.status == 200
            time.sleep(1.0)  # its sessions' next owners ask it for them
            nodes[0].stop()  # a graceful stop: what is left goes to the next owners
            time.sleep(1.0)
    assert "node1" in _owners(load, backends)  # node1 held some users' sessions
    assert load.failures == [], load.failures[:5]
    assert load.wrong() == []


def test_a_node_that_joins_behind_nginx_takes_its_sessions_over(tmp_path: Path) -> None:
    """The same behind nginx, whose ring the nodes replicate: the new node asks the
    owner nginx's ring gave the session before it joined. nginx's old workers go on with
    the old ring for a while, so a session may go back and forth, and two nodes may ask
    each other at once: nodes with a thread to spare answer while they wait."""
    from statescale.routing.balancers import get

    port = free_port()
    with ExitStack() as stack:
        _, backends = sticky_nodes(stack, balancer="nginx", args=THREADED)
        nginx = start_balancer("nginx", backends, port, tmp_path)
        stack.callback(stop_process, nginx, 10)
        wait_serving(port, nginx)
        with Load(port, users=20) as load:
            time.sleep(1.0)
            _, new = add_sticky_node(stack, backends, balancer="nginx", args=THREADED)
            balancer = get("nginx")
            config = balancer.config(
                [*backends, new], listen=f"127.0.0.1:{port}", cookie="statescale"
            )
            (tmp_path / balancer.config_name).write_text(config)
            nginx.send_signal(signal.SIGHUP)  # new workers, with the new ring
            time.sleep(2.0)
    assert load.failures == [], load.failures[:5]
    assert load.wrong() == []
