"""Sticky mode end to end: four gunicorn nodes keeping sessions in memory behind real
nginx and HAProxy, started from `statescale lb-config`'s files. Every node mints IDs the
balancer routes back to it, so a session's first request already lands on its owner."""

from __future__ import annotations

import signal
import subprocess
from contextlib import ExitStack
from pathlib import Path

import pytest

from statescale.embedded import free_port
from statescale.harness import Gunicorn, SessionClient, interleaved_increments
from statescale.routing.lb_config import Backend, haproxy_config, nginx_config

pytestmark = pytest.mark.integration


def start_balancer(
    kind: str, backends: list[Backend], port: int, tmp: Path
) -> subprocess.Popen[bytes]:
    listen = f"127.0.0.1:{port}"
    if kind == "nginx":
        (tmp / "tmp").mkdir(exist_ok=True)
        (tmp / "nginx.conf").write_text(nginx_config(backends, listen=listen))
        command = ["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-g", "daemon off;"]
    else:
        (tmp / "haproxy.cfg").write_text(haproxy_config(backends, listen=listen))
        command = ["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")]
    return subprocess.Popen(command, stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("balancer", ["nginx", "haproxy"])
def test_50_sessions_40_increments_each_stay_on_one_node(balancer: str, tmp_path: Path) -> None:
    nodes = [Gunicorn(workers=1) for _ in range(4)]
    backends = [Backend(f"node{i}", "127.0.0.1", n.port) for i, n in enumerate(nodes, 1)]
    specs = ",".join(f"{b.name}={b.address}" for b in backends)
    port = free_port()
    with ExitStack() as stack:
        for backend, node in zip(backends, nodes, strict=True):
            node.env.update(
                STATESCALE_MODE="sticky",
                STATESCALE_STORE="memory",
                STATESCALE_BALANCER=balancer,
                STATESCALE_BACKENDS=specs,
                STATESCALE_NODE=backend.name,
            )
            stack.enter_context(node)
        proxy = start_balancer(balancer, backends, port, tmp_path)
        stack.callback(lambda: (proxy.send_signal(signal.SIGTERM), proxy.wait(10)))
        SessionClient(port).get("/health")  # wait for the balancer (the client retries)
        seen = interleaved_increments(port, users=50, rounds=40)
        logs = "".join(node.log() for node in nodes)
    assert seen.wrong == []
    assert seen.one_node_each  # one node per session, from the first request
    assert len(set(seen.first_pid.values())) >= 3  # spread over the nodes
    assert "several worker processes" not in logs
