"""The gunicorn hooks' supervision of the router, against a stand-in arbiter (the real
one: tests/integration/test_sticky_gunicorn.py)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from statescale import gunicorn as hooks
from statescale.config import Settings
from statescale.exceptions import ConfigError


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def error(self, message: str, *args: Any) -> None:
        self.lines.append(message % args)


class _Arbiter:
    """What the supervision wraps: the arbiter's reaping and its round."""

    def __init__(self) -> None:
        self.log = _Log()
        self.rounds = self.reaped = 0

    def reap_workers(self) -> None:
        self.reaped += 1

    def manage_workers(self) -> None:
        self.rounds += 1


def _exited(code: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
    process.wait()
    return process


def test_a_router_that_dies_at_start_again_is_retried_later_and_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr(hooks.time, "monotonic", lambda: clock[0])
    master = hooks._Master(Settings.from_env({}))
    starts: list[float] = []

    def start(server: Any, master: hooks._Master) -> None:
        starts.append(clock[0])
        if len(starts) < 4:
            master.router = _exited(3)
            raise ConfigError("statescale router exited at once (status 3)")
        master.router = _Running()  # type: ignore[assignment]

    monkeypatch.setattr(hooks, "_start_router", start)
    arbiter = _Arbiter()
    master.router = first = _exited(7)
    hooks._supervise_router(arbiter, master)

    arbiter.reap_workers()
    assert arbiter.reaped == 1  # gunicorn's own reaping still runs
    for _ in range(40):  # arbiter rounds, 0.5 s apart
        arbiter.manage_workers()
        clock[0] += 0.5
    assert arbiter.rounds == 40
    assert [t - 100.0 for t in starts] == [0.0, 1.0, 3.0, 7.0]  # waits of 1, 2, 4 s
    lines = arbiter.log.lines
    assert lines[0] == (
        f"statescale: the router (pid {first.pid}) exited with code 7; starting another"
    )
    assert lines[1].endswith("exited at once (status 3); next try in 1 s")
    assert lines[2].endswith("exited with code 3; starting another")
    assert [line.rpartition("next try in ")[2] for line in lines[1::2]] == ["1 s", "2 s", "4 s"]
    assert len(lines) == 7
    assert master.restart_wait == 0.0  # it runs: a later death restarts it at once


class _Running:
    pid = 1
    returncode = None

    def poll(self) -> None:
        return None
