"""HTTP load for the benchmarks: wrk when it is installed, else a small asyncio
generator, so the benchmark runs on a machine with nothing but the Python packages.

Both take the same *mix*: each request is a write (``POST /api/incr?key=n``) with
probability ``writes``, else a read (``GET /api/session``), and carries one of
``cookies`` as its session cookie. Both answer :class:`Load`: requests per second and
latency percentiles. A run with any failed request (a socket error or a status other
than 2xx) is an error, not a figure.

The Python generator keeps ``connections`` clients going at once, each with keep-alive
where the server allows it (gunicorn's sync workers close after each response; the
router and nginx keep the connection). It costs more CPU per request than wrk, which
shares the machine with the servers, so its figures are lower; compare ratios within
one run, which every configuration gets alike.
"""

from __future__ import annotations

import asyncio
import random
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace

READ = ("GET", "/api/session")
WRITE = ("POST", "/api/incr?key=n")

_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_COUNT = re.compile(r"(\d+) requests in ")
_LATENCY = re.compile(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


@dataclass(frozen=True)
class Load:
    """One run's figures: requests per second and latency percentiles in ms; and the
    cores the load generator itself kept busy (its CPU seconds a second): it shares the
    machine with the servers, the same for every configuration, so ratios between
    configurations are pulled toward 1 by that much."""

    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    client_cores: float = 0.0
    requests: int = 0  # answered in all (what per-request costs divide by)


@dataclass(frozen=True)
class _Plan:
    """What to send: to 127.0.0.1:``port``, each request with one of ``cookies``; one
    ``route`` (method, path), or else the mix with ``writes`` the share of writes."""

    port: int
    cookies: list[str]
    writes: float
    duration: float
    connections: int
    route: tuple[str, str] | None


GENERATORS = ("auto", "wrk", "python")


def generator(choice: str = "auto") -> str:
    """The load generator ``choice`` names: ``wrk``, ``python``, or for ``auto`` wrk when
    it is installed, else ``python``."""
    if choice not in GENERATORS:
        raise ValueError(f"load generator {choice!r}: use one of {', '.join(GENERATORS)}")
    if choice != "auto":
        return choice
    return "wrk" if shutil.which("wrk") else "python"


def run_load(
    port: int,
    cookies: list[str],
    *,
    writes: float,
    duration: float,
    connections: int = 16,
    route: tuple[str, str] | None = None,
    tool: str = "auto",
) -> Load:
    """Load 127.0.0.1:``port`` for ``duration`` seconds with the mix ``writes`` (the
    share of writes), or with one ``route`` (method, path) only, driven by ``tool``
    (see :func:`generator`)."""
    plan = _Plan(port, cookies, writes, duration, connections, route)
    if generator(tool) == "wrk":
        return _wrk(plan)
    cpu, started = time.thread_time(), time.monotonic()  # the generator's thread alone
    load = asyncio.run(_python(plan))
    cores = (time.thread_time() - cpu) / (time.monotonic() - started)
    return replace(load, client_cores=cores)


def _wrk(plan: _Plan) -> Load:
    port, duration, route = plan.port, plan.duration, plan.route
    table = ", ".join(f'"{c}"' for c in plan.cookies) or '""'
    if route is not None:
        choose = f'  return wrk.format("{route[0]}", "{route[1]}", h)\n'
    else:
        choose = (
            f"  if math.random() < {plan.writes} then\n"
            f'    return wrk.format("{WRITE[0]}", "{WRITE[1]}", h)\n  end\n'
            f'  return wrk.format("{READ[0]}", "{READ[1]}", h)\n'
        )
    script = (
        f"local cookies = {{{table}}}\n"
        "request = function()\n"
        '  local h = {Cookie = "statescale=" .. cookies[math.random(#cookies)]}\n'
        f"{choose}end\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script)
        lua.flush()
        seconds = max(1, round(duration))  # wrk takes whole seconds only
        command = ["wrk", "-t2", f"-c{plan.connections}", f"-d{seconds}s", "--latency"]
        before, started = _children_cpu(), time.monotonic()
        out = subprocess.run(
            [*command, "-s", lua.name, f"http://127.0.0.1:{port}/"],
            capture_output=True,
            text=True,
            check=True,
            timeout=duration + 60,
        ).stdout
        cores = (_children_cpu() - before) / (time.monotonic() - started)
    if "Non-2xx" in out or re.search(r"Socket errors:.*\b(connect|read|write|timeout) [1-9]", out):
        raise RuntimeError(f"wrk saw failed requests on port {port}:\n{out}")
    rps = _RPS.search(out)
    latency = {p: float(v) * _UNIT[u] for p, v, u in _LATENCY.findall(out)}
    if rps is None or set(latency) != {"50", "90", "99"}:
        raise RuntimeError(f"could not read wrk's output:\n{out}")
    count = _COUNT.search(out)
    return Load(
        float(rps.group(1)),
        latency["50"],
        latency["90"],
        latency["99"],
        cores,
        int(count.group(1)) if count else 0,
    )


def _children_cpu() -> float:
    """CPU seconds of this process's children that have ended (wrk, once waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def _python(plan: _Plan) -> Load:
    port, cookies, writes, route = plan.port, plan.cookies, plan.writes, plan.route
    heads = {
        (method, path, cookie): (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Cookie: statescale={cookie}\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        for method, path in ([route] if route else [READ, WRITE])
        for cookie in cookies or [""]
    }
    latencies: list[float] = []
    failures: list[str] = []
    deadline = time.monotonic() + plan.duration

    async def client() -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while time.monotonic() < deadline and not failures:
            method, path = route or (WRITE if random.random() < writes else READ)
            head = heads[(method, path, random.choice(cookies or [""]))]
            started = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert reader is not None
                writer.write(head)
                status, keep = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                failures.append(f"{method} {path}: {type(exc).__name__}: {exc}")
                break
            latencies.append(time.perf_counter() - started)
            if not 200 <= status < 300:
                failures.append(f"{method} {path}: HTTP {status}")
            if not keep:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(plan.connections)))
    elapsed = time.monotonic() - started
    if failures:
        raise RuntimeError(f"failed requests on port {port}: {failures[0]}")
    if len(latencies) < 2:
        raise RuntimeError(f"too few requests on port {port} to measure")
    cuts = statistics.quantiles(latencies, n=100)
    return Load(
        len(latencies) / elapsed,
        cuts[49] * 1e3,
        cuts[89] * 1e3,
        cuts[98] * 1e3,
        requests=len(latencies),
    )


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; its status and whether the connection stays open."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    keep = headers.get("connection") != "close" and lines[0].startswith("HTTP/1.1")
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.read()  # delimited by the close
        keep = False
    return status, keep
