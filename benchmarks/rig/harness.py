"""Real processes for the demo, the benchmarks and the integration tests: gunicorn serving
an app with statescale's hooks, and a small HTTP client that keeps one session cookie (a
fresh connection per request, so gunicorn's workers share the requests out).

Needs gunicorn (``pip install 'statescale[demo]'``). Not part of the library's API."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from statescale.gunicorn import command as gunicorn_command
from statescale.processes import free_port, stop_process
from statescale.routing.backends import Backend
from statescale.routing.balancers import get as get_balancer

ROOT = Path(__file__).resolve().parents[2]  # the checkout: demo_app/ and benchmarks/
SECRET = "integration-secret-0123456789abcdef"
ADMIN_TOKEN = "integration-admin-token-0123456789"


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
    """One simulated user: keeps the cookies the server sets, as a browser would."""

    def __init__(self, port: int, cookie_name: str = "statescale") -> None:
        self.port = port
        self.cookie_name = cookie_name
        self.cookies: dict[str, str] = {}

    @property
    def cookie(self) -> str | None:
        """The session cookie's value."""
        return self.cookies.get(self.cookie_name)

    @cookie.setter
    def cookie(self, value: str | None) -> None:
        self.cookies = {} if value is None else {self.cookie_name: value}

    def request(
        self,
        method: str,
        path: str,
        timeout: float = 10.0,
        cookie_header: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """One request with the cookies kept so far (or ``cookie_header`` as it is)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        jar = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if cookie_header is not None:
            jar = cookie_header
        headers = {**({"Cookie": jar} if jar else {}), **(headers or {})}
        started = time.monotonic()
        for attempt in range(40):  # a server that is still starting refuses for a moment
            try:
                conn.request(method, path, headers=headers)
                break
            except ConnectionRefusedError:
                conn.close()
                if attempt == 39:
                    raise
                time.sleep(0.05)
        try:
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        elapsed = time.monotonic() - started
        for header in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = header.partition("=")
            value = rest.split(";", 1)[0]
            if value and "Max-Age=0" not in header:
                self.cookies[name] = value
            else:
                self.cookies.pop(name, None)
        return Reply(response.status, dict(response.headers), body, elapsed)

    def post(self, path: str, headers: Mapping[str, str] | None = None) -> Reply:
        return self.request("POST", path, headers=headers)

    def get(self, path: str) -> Reply:
        return self.request("GET", path)


#: The masters started and not yet stopped (for :func:`stop_together`).
_running: weakref.WeakSet[Gunicorn] = weakref.WeakSet()


def stop_together() -> None:
    """SIGTERM every gunicorn master this process started and has not stopped, all at
    once: a graceful stop takes half a second to two (workers finish, sticky nodes
    drain and hand over), so a run that ends with thirty of them waits for the slowest
    rather than for the sum. Their ``stop()`` then only waits. (Graceful, as a stop
    one at a time is: sticky nodes still hand over, to peers that stop too.)"""
    for server in list(_running):
        if server.process is not None:
            server.process.terminate()  # (a master that has exited is not signalled)
        if server.upgraded is not None:  # the new master, not our child
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.upgraded, signal.SIGTERM)


class Gunicorn:
    """``gunicorn -w N APP`` on a free loopback port, with statescale's hooks."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        workers: int = 4,
        args: tuple[str, ...] = (),
        app: str = "demo_app:app",
    ) -> None:
        self.port = free_port()
        self.workers = workers
        self.env = {
            **os.environ,
            "STATESCALE_SECRET_KEYS": SECRET,
            "STATESCALE_COOKIE_SECURE": "0",
            # A Redis store with no STATESCALE_REDIS_URL gets the deployment's embedded
            # server, which the hooks start in the master and every worker shares.
            "STATESCALE_EMBEDDED_REDIS": "1",
            **(env or {}),
        }
        self.args = args
        self.app = app
        fd, self.log_path = tempfile.mkstemp(prefix="gunicorn-", suffix=".log")
        self.log_file = os.fdopen(fd, "wb")
        self.process: subprocess.Popen[bytes] | None = None
        self.upgraded: int | None = None  # a new master started by upgrade()
        self._final_log = ""

    def start(self, timeout: float = 20.0) -> Gunicorn:
        command = [
            *gunicorn_command(),
            "-w",
            str(self.workers),
            "-b",
            f"127.0.0.1:{self.port}",
            "--timeout",
            "10",
            "--graceful-timeout",
            "5",
            "--no-control-socket",
            "-c",
            "python:statescale.gunicorn",
            *self.args,
            self.app,
        ]
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT
        )
        _running.add(self)
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

    def children(self, master: int | None = None) -> dict[int, str]:
        """The live children of ``master`` (default: the one this started), each with
        what it runs: ``redis-server``, ``router`` (statescale's) or ``gunicorn``."""
        if master is None:
            assert self.process is not None
            master = self.process.pid
        found = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                comm, _, rest = stat.read_text().partition(") ")
                state, parent = rest.split()[:2]
                cmdline = (stat.parent / "cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if int(parent) != master or state == "Z":  # not its child, or dead
                continue
            if "redis" in comm:
                kind = "redis-server"
            elif b"statescale\x00router" in cmdline:
                kind = "router"
            else:
                kind = "gunicorn"
            found[int(stat.parent.name)] = kind
        return found

    def pids(self) -> set[int]:
        """The master and all its children: workers, the router, the embedded Redis."""
        assert self.process is not None
        return {self.process.pid, *self.children()}

    def worker_pids(self) -> set[int]:
        """The master's workers: its children, less what a hook may start (the
        embedded redis-server, the sticky router)."""
        return {pid for pid, kind in self.children().items() if kind == "gunicorn"}

    def upgrade(self, timeout: float = 20.0) -> int:
        """An in-place upgrade: USR2 starts a new master beside this one; once it
        serves, TERM stops the old one. The new master's pid (``stop`` ends it)."""
        assert self.process is not None
        old = self.process.pid
        before = set(self.children())
        self.signal(signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            masters = [
                pid
                for pid in set(self.children()) - before
                if len(self.children(pid)) >= self.workers
            ]
            if masters:  # its workers are up (and its router, in sticky mode, starting)
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"no new master within {timeout}s:\n{self.log()}")
        self.upgraded = masters[0]
        self.signal(signal.SIGTERM)
        self.process.wait(15)
        assert old not in self.children(self.upgraded)
        return self.upgraded

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def log(self) -> str:
        if self.log_file.closed:
            return self._final_log
        return Path(self.log_path).read_text(errors="replace")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.upgraded is not None:  # the new master: our grandchild, now orphaned
            _stop_pid(self.upgraded)
        stop_process(self.process, 15)
        self.process = None
        _running.discard(self)
        self._final_log = self.log()
        self.log_file.close()
        Path(self.log_path).unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL to the master and all its children, as a machine that is gone: for
        a test's end, once what it asserts is in (a graceful stop drains and hands
        over, seconds each node)."""
        if self.process is None:
            return
        for pid in [*self.children(), self.process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(10)
        self.stop()  # (reaped: keeps the log, closes the file)

    def __enter__(self) -> Gunicorn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_TICK = os.sysconf("SC_CLK_TCK")


def usage(pids: set[int]) -> dict[int, tuple[float, int]]:
    """For each of ``pids`` still alive: the CPU seconds (user and system, all its
    threads) and context switches (voluntary and not, all its threads) it has used so
    far, from ``/proc``. :func:`spent` takes the difference of two readings."""
    found = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            switches = sum(
                int(line.split()[1])
                for task in Path(f"/proc/{pid}/task").iterdir()
                for line in (task / "status").read_text().splitlines()
                if "ctxt_switches" in line
            )
        except OSError:  # gone meanwhile
            continue
        found[pid] = ((int(fields[11]) + int(fields[12])) / _TICK, switches)
    return found


def spent(
    before: dict[int, tuple[float, int]], after: dict[int, tuple[float, int]]
) -> tuple[float, int]:
    """CPU seconds and context switches used between two :func:`usage` readings by the
    processes alive at both (one that exited or started in between counts nothing)."""
    common = before.keys() & after.keys()
    return (
        sum(after[p][0] - before[p][0] for p in common),
        sum(after[p][1] - before[p][1] for p in common),
    )


def _stop_pid(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM a process that is not our child, and wait until it is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        state = (Path(f"/proc/{pid}/stat").read_text(errors="replace").rpartition(") ")[2])[:1]
        if state == "Z":
            return
        time.sleep(0.05)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)


class Load:
    """``users`` simulated users, each with its own cookie, incrementing ``key`` in a
    loop on threads of their own until :meth:`stop`: what a fleet change happens under.
    A failed request (a refused or reset connection, a status other than 200) is
    counted, not raised."""

    def __init__(self, port: int, users: int = 8, key: str = "c") -> None:
        self.clients = [SessionClient(port) for _ in range(users)]
        self.key = key
        self.answers: list[list[int]] = [[] for _ in range(users)]
        self.pids: list[list[int]] = [[] for _ in range(users)]  # who served each answer
        self.failures: list[str] = []
        self.failed_at: list[list[int]] = [[] for _ in range(users)]  # answers before each
        self.replies: list[tuple[int, float]] = []  # (status, seconds) of every reply
        self._running = True
        self._threads = [
            threading.Thread(target=self._user, args=(n,), daemon=True) for n in range(users)
        ]

    def _user(self, n: int) -> None:
        client = self.clients[n]
        while self._running:
            try:
                reply = client.post(f"/api/incr?key={self.key}")
            except (OSError, http.client.HTTPException) as exc:  # a worker killed mid-reply
                self.failures.append(f"user {n}: {type(exc).__name__}: {exc}")
                self.failed_at[n].append(len(self.answers[n]))
                continue
            self.replies.append((reply.status, reply.elapsed))
            if reply.status != 200:
                self.failures.append(f"user {n}: {reply.status} {reply.body[:100]!r}")
                self.failed_at[n].append(len(self.answers[n]))
                continue
            body = reply.json
            self.answers[n].append(body["value"])
            self.pids[n].append(body["pid"])

    @property
    def requests(self) -> int:
        return sum(len(a) for a in self.answers) + len(self.failures)

    def wrong(self) -> list[tuple[int, int, int]]:
        """(user, previous, next) wherever a user's counter did not go on by one. Across
        failed requests it may go on by one more for each: such a write may have been
        stored and not acknowledged (its worker killed in between)."""
        return [
            (n, a, b)
            for n, seen in enumerate(self.answers)
            for i, (a, b) in enumerate(itertools.pairwise(seen))
            if not a < b <= a + 1 + self.failed_at[n].count(i + 1)
        ]

    def failures_per_user(self) -> list[int]:
        return [len(f) for f in self.failed_at]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._running = False
        for thread in self._threads:
            thread.join(30)

    def __exit__(self, *exc: object) -> None:
        self.stop()


class UsersResult:
    """What :func:`interleaved_increments` saw."""

    def __init__(self) -> None:
        self.wrong: list[tuple[int, int, int, Any]] = []  # (user, expected, status, body)
        self.pids: dict[int, set[int]] = {}  # user -> the pids that served them
        self.first_pid: dict[int, int] = {}
        self.clients: list[SessionClient] = []  # the users, cookies and all, to go on with

    @property
    def one_node_each(self) -> bool:
        return all(len(p) == 1 for p in self.pids.values())


def interleaved_increments(port: int, users: int, rounds: int, key: str = "c") -> UsersResult:
    """``users`` simulated users, each with its own cookie, increment ``key`` ``rounds``
    times, interleaved round by round; each knows what its counter must say."""
    clients = [SessionClient(port) for _ in range(users)]
    result = UsersResult()
    result.clients = clients
    for expected in range(1, rounds + 1):
        for n, client in enumerate(clients):
            reply = client.post(f"/api/incr?key={key}")
            if reply.status != 200:
                result.wrong.append((n, expected, reply.status, reply.body))
                continue
            body = reply.json
            result.pids.setdefault(n, set()).add(body["pid"])
            result.first_pid.setdefault(n, body["pid"])
            if body["value"] != expected:
                result.wrong.append((n, expected, reply.status, body))
    return result


def sticky_nodes(
    stack: ExitStack,
    count: int = 4,
    balancer: str = "statescale",
    args: tuple[str, ...] = (),
    app: str = "demo_app:app",
) -> tuple[list[Gunicorn], list[Backend]]:
    """``count`` single-worker nodes of ``app`` in sticky mode on the memory store, each
    told every node (``STATESCALE_BACKENDS``), its own name and whose ring routes them;
    stopped when ``stack`` closes. ``args``: more gunicorn options for each."""
    nodes = [Gunicorn(workers=1, args=args, app=app) for _ in range(count)]
    backends = [Backend(f"node{i}", "127.0.0.1", g.port) for i, g in enumerate(nodes, 1)]
    for backend, node in zip(backends, nodes, strict=True):
        _sticky_env(node, backend, backends, balancer)
        stack.enter_context(node)
    return nodes, backends


def add_sticky_node(
    stack: ExitStack,
    backends: list[Backend],
    balancer: str = "statescale",
    args: tuple[str, ...] = (),
    app: str = "demo_app:app",
) -> tuple[Gunicorn, Backend]:
    """One more node beside ``backends`` (the new node knows them all; they are not told)."""
    node = Gunicorn(workers=1, args=args, app=app)
    backend = Backend(f"node{len(backends) + 1}", "127.0.0.1", node.port)
    _sticky_env(node, backend, [*backends, backend], balancer)
    stack.enter_context(node)
    return node, backend


def _sticky_env(node: Gunicorn, me: Backend, backends: list[Backend], balancer: str) -> None:
    node.env.update(
        STATESCALE_MODE="sticky",
        STATESCALE_STORE="memory",
        STATESCALE_BALANCER=balancer,
        STATESCALE_BACKENDS=",".join(b.spec for b in backends),
        STATESCALE_NODE=me.name,
    )


def registered_node(
    stack: ExitStack,
    registry: str,
    name: str,
    *,
    mode: str = "sticky",
    workers: int = 1,
    args: tuple[str, ...] = ("--threads", "4"),
    balancer: str = "statescale",
    env: Mapping[str, str] | None = None,
    app: str = "demo_app:app",
) -> Gunicorn:
    """A node of ``app`` that registers itself in ``registry`` as ``name`` and follows it
    (sticky mode on the memory store, or ``mode``), on ``balancer``'s ring; stopped when
    ``stack`` closes. ``env``: more environment, or other values (affinity:
    ``STATESCALE_REDIS_URL``; ``STATESCALE_DRAIN``, 1.5 s here)."""
    node = Gunicorn(workers=workers, args=args, app=app)
    node.env.update(
        STATESCALE_BALANCER=balancer,
        STATESCALE_MODE=mode,
        STATESCALE_REGISTRY=registry,
        STATESCALE_NODE=name,
        STATESCALE_ADVERTISE=f"127.0.0.1:{node.port}",
        STATESCALE_DRAIN="1.5",
    )
    if mode == "sticky":
        node.env["STATESCALE_STORE"] = "memory"
    node.env.update(env or {})
    stack.enter_context(node)
    return node


def start_balancer(
    kind: str, backends: list[Backend], port: int, folder: Path, cookie: str = "statescale"
) -> subprocess.Popen[bytes]:
    """The balancer ``kind`` (a name in statescale's balancer registry) on
    127.0.0.1:``port``, from the configuration `statescale lb-config` writes, in ``folder``."""
    balancer = get_balancer(kind)
    listen = f"127.0.0.1:{port}"
    config = folder / balancer.config_name
    config.write_text(balancer.config(backends, listen=listen, cookie=cookie))
    command = balancer.command(config, listen=listen, cookie=cookie)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_serving(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15
) -> None:
    """Until ``GET /health`` on 127.0.0.1:``port`` answers 200 (a router or balancer
    in front of nodes that are up); ``proc``, the process that is to serve it, must not
    exit meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if SessionClient(port).get("/health").status == 200:
                return
        except OSError:
            pass
        assert proc is None or proc.poll() is None, f"the server for port {port} exited"
        assert time.monotonic() < deadline, f"nothing served port {port} within {timeout}s"
        time.sleep(0.1)


def start_router(
    backends: list[Backend], port: int, *extra: str, stderr: int = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    """`statescale router` on 127.0.0.1:``port`` in front of ``backends``; its admin
    endpoint, if ``extra`` asks for one, takes ``ADMIN_TOKEN``."""
    args = [a for b in backends for a in ("--backend", b.spec)]
    command = [sys.executable, "-m", "statescale", "router", *args, "--listen", f"127.0.0.1:{port}"]
    env = {**os.environ, "STATESCALE_ADMIN_TOKEN": ADMIN_TOKEN}
    return subprocess.Popen([*command, *extra], stdout=subprocess.DEVNULL, stderr=stderr, env=env)
