"""Small process and port helpers for the servers statescale starts (the embedded Redis,
the gunicorn master's router) and for tests."""

from __future__ import annotations

import contextlib
import mmap
import random
import shutil
import socket
import subprocess
import sys

from .exceptions import StateScaleError


def _ephemeral_start() -> int:
    """Where the kernel starts handing out ports to outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            return int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_issued: set[int] = set()


def free_port(*, also_free: int | None = None) -> int:
    """A free loopback port for a server to bind soon, chosen below the kernel's range
    for outgoing connections: a port from that range (what binding port 0 gives) can be
    taken by any client socket before the server gets to it. ``also_free``: an offset
    whose port must be free too (a Redis Cluster node's bus port is port + 10000)."""
    top = _ephemeral_start() - (also_free or 0)
    for _ in range(500):
        port = random.randrange(10000, top)
        if port in _issued:  # handed out already, perhaps not bound yet
            continue
        if _bindable(port) and (also_free is None or _bindable(port + also_free)):
            _issued.add(port)
            return port
    raise StateScaleError("no free loopback port below the ephemeral range")


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM ``process`` and wait ``timeout`` seconds for it to finish; then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def die_with_parent() -> list[str]:
    """A command prefix (util-linux ``setpriv``) that has the kernel SIGTERM the server
    when the process that started it dies, even by kill -9; empty where there is none."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


class SharedFlag:
    """A flag shared with the processes forked after it is made (an anonymous shared
    mapping): a gunicorn master's word to its workers."""

    def __init__(self) -> None:
        self._byte = mmap.mmap(-1, 1)

    def set(self) -> None:
        self._byte[0] = 1

    def is_set(self) -> bool:
        return self._byte[0] == 1
