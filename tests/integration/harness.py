"""Real processes for integration tests and benchmarks: gunicorn serving demo_app, and a
small HTTP client that keeps one session cookie (a fresh connection per request, so
gunicorn's workers share the requests out)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from statescale.embedded import free_port

REPO = Path(__file__).resolve().parents[2]
SECRET = "integration-secret-0123456789abcdef"


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, elapsed: float) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.elapsed = elapsed

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class SessionClient:
    """One simulated user: remembers the cookie the server last set."""

    def __init__(self, port: int, cookie_name: str = "statescale") -> None:
        self.port = port
        self.cookie_name = cookie_name
        self.cookie: str | None = None

    def request(self, method: str, path: str, timeout: float = 10.0) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers = {"Cookie": f"{self.cookie_name}={self.cookie}"} if self.cookie else {}
        started = time.monotonic()
        try:
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        elapsed = time.monotonic() - started
        for header in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = header.partition("=")
            if name == self.cookie_name:
                value = rest.split(";", 1)[0]
                self.cookie = value or None
        return Reply(response.status, dict(response.headers), body, elapsed)

    def post(self, path: str) -> Reply:
        return self.request("POST", path)

    def get(self, path: str) -> Reply:
        return self.request("GET", path)


class Gunicorn:
    """``gunicorn -w N demo_app:app`` from the repository root (so gunicorn.conf.py loads)."""

    def __init__(
        self, env: Mapping[str, str] | None = None, workers: int = 4, args: tuple[str, ...] = ()
    ) -> None:
        self.port = free_port()
        self.workers = workers
        self.env = {
            **os.environ,
            "STATESCALE_SECRET_KEYS": SECRET,
            "STATESCALE_COOKIE_SECURE": "0",
            **(env or {}),
        }
        self.args = args
        self.log_file = tempfile.NamedTemporaryFile(prefix="gunicorn-", suffix=".log", delete=False)
        self.process: subprocess.Popen[bytes] | None = None
        self._final_log = ""

    def start(self, timeout: float = 20.0) -> Gunicorn:
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            str(self.workers),
            "-b",
            f"127.0.0.1:{self.port}",
            "--timeout",
            "10",
            "--graceful-timeout",
            "5",
            "--no-control-socket",
            *self.args,
            "demo_app:app",
        ]
        self.process = subprocess.Popen(
            command, cwd=REPO, env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"gunicorn exited:\n{self.log()}")
            try:
                if (
                    SessionClient(self.port).get("/health").status == 200
                    and len(self.worker_pids()) == self.workers
                ):
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn did not come up in {timeout}s:\n{self.log()}")

    def worker_pids(self) -> set[int]:
        assert self.process is not None
        pids = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                comm, _, rest = stat.read_text().partition(") ")
                fields = [comm, *rest.split()]
            except OSError:
                continue
            # The master's children, less the embedded redis-server a hook may start.
            if int(fields[2]) == self.process.pid and "redis" not in fields[0]:
                pids.add(int(stat.parent.name))
        return pids

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def log(self) -> str:
        if self.log_file.closed:
            return self._final_log
        return Path(self.log_file.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        self._final_log = self.log()
        self.log_file.close()
        Path(self.log_file.name).unlink(missing_ok=True)

    def __enter__(self) -> Gunicorn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
