"""Sticky mode end to end: four gunicorn nodes keeping sessions in memory behind real
nginx and HAProxy, started from `statescale lb-config`'s files. Every node mints IDs the
balancer routes back to it, so a session's first request already lands on its owner."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest

from benchmarks.rig.harness import (
    SessionClient,
    interleaved_increments,
    start_balancer,
    sticky_nodes,
)
from statescale.processes import free_port, stop_process

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("balancer", ["nginx", "haproxy"])
def test_50_sessions_40_increments_each_stay_on_one_node(balancer: str, tmp_path: Path) -> None:
    port = free_port()
    with ExitStack() as stack:
        nodes, backends = sticky_nodes(stack, balancer=balancer)
        proxy = start_balancer(balancer, backends, port, tmp_path)
        stack.callback(stop_process, proxy, 10)
        SessionClient(port).get("/health")  # wait for the balancer (the client retries)
        seen = interleaved_increments(port, users=50, rounds=40)
        logs = "".join(node.log() for node in nodes)
    assert seen.wrong == []
    assert seen.one_node_each  # one node per session, from the first request
    assert len(set(seen.first_pid.values())) >= 3  # spread over the nodes
    assert "several worker processes" not in logs
