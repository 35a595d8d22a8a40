"""A throwaway ``redis-sentinel`` (the ``redis-server`` binary in sentinel mode) on a
free loopback port, watching one master as ``SERVICE``: for the Sentinel tests."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from statescale.embedded import EmbeddedRedis
from statescale.processes import free_port, stop_process

SERVICE = "mymaster"


@dataclass(frozen=True)
class Sentinel:
    """A running sentinel: its port, and its process, which a test may pause."""

    port: int
    process: subprocess.Popen[bytes]

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def wait_for_replica(self, timeout: float = 30.0) -> None:
        """Until the sentinel has found a replica of its master, in sync (so that a
        failover can promote it); it may still be starting meanwhile."""
        watcher = redis.Redis(port=self.port, decode_responses=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                replicas = watcher.sentinel_slaves(SERVICE)
            except redis.RedisError:  # not listening yet
                replicas = []
            if any(
                r.get("flags") == "slave" and r.get("master-link-status") == "ok" for r in replicas
            ):
                return
            assert time.monotonic() < deadline, "the sentinel never saw the replica"
            time.sleep(0.2)


@contextmanager
def sentinel(
    master: EmbeddedRedis, folder: Path, *, down_after_ms: int | None = None
) -> Iterator[Sentinel]:
    """A sentinel of ``master`` (quorum 1), its configuration in ``folder``; yields it
    running, and stops it on the way out (resumed first, if paused). ``down_after_ms``:
    how soon it takes a silent master for dead and promotes a replica (Redis's default
    otherwise: 30 s)."""
    port = free_port()
    lines = [
        f"port {port}",
        "bind 127.0.0.1",
        f"dir {folder}",
        f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} 1",
    ]
    if down_after_ms is not None:
        lines += [
            f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}",
            f"sentinel failover-timeout {SERVICE} 10000",
        ]
    conf = folder / "sentinel.conf"
    conf.write_text("\n".join(lines) + "\n")
    command = [master.executable, str(conf), "--sentinel"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    running = Sentinel(port, process)
    try:
        yield running
    finally:
        running.resume()
        stop_process(process, 5)
