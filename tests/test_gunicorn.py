"""The gunicorn hooks' supervision of the router in the master, against a stand-in
arbiter and stand-in processes (the real ones: test_a_router_that_dies_is_started_again
in tests/integration/test_sticky_gunicorn.py)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from statescale import gunicorn as hooks
from statescale.config import Settings
from statescale.exceptions import ConfigError

_pids = itertools.count(1000)


class _Process:
    """A stand-in for the router's Popen: ``returncode`` None while it runs."""

    def __init__(self, events: list[str], returncode: int | None = None) -> None:
        self.pid = next(_pids)
        self.returncode = returncode
        self.events = events

    def poll(self) -> int | None:
        self.events.append(f"poll {self.pid}")
        return self.returncode


class _Arbiter:
    """What the supervision wraps: the arbiter's reaping and its round."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.errors: list[str] = []
        self.log = self

    def error(self, message: str, *args: Any) -> None:
        self.errors.append(message % args)

    def reap_workers(self) -> None:
        self.events.append("gunicorn reaps")

    def manage_workers(self) -> None:
        self.events.append("gunicorn manages")


class _Rig:
    """A master with a supervised router, a clock, and a ``_start_router`` that does
    what ``outcomes`` say, one start each: ``"runs"``, ``"dies"`` (at once: a
    ``ConfigError``, the dead router kept) or ``"no fork"`` (an ``OSError``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, outcomes: list[str]) -> None:
        self.now = 100.0
        monkeypatch.setattr(hooks.time, "monotonic", lambda: self.now)
        self.events: list[str] = []
        self.starts: list[float] = []
        self.master = hooks._Master(Settings.from_env({}))
        self.arbiter = _Arbiter(self.events)
        outcome = iter(outcomes)

        def start(server: Any, master: hooks._Master) -> None:
            self.starts.append(self.now)
            what = next(outcome)
            if what == "no fork":
                raise OSError(12, "Cannot allocate memory")
            master.router = _Process(self.events, 3 if what == "dies" else None)  # type: ignore[assignment]
            if what == "dies":
                raise ConfigError("statescale router exited at once (status 3)")
            master.restarts.started = self.now

        monkeypatch.setattr(hooks, "_start_router", start)
        hooks._supervise_router(self.arbiter, self.master)

    def run(self, seconds: float) -> None:
        """The arbiter's rounds, half a second apart."""
        for _ in range(int(seconds * 2)):
            self.arbiter.manage_workers()
            self.now += 0.5

    def router(self) -> _Process:
        return self.master.router  # type: ignore[return-value]


def test_a_router_that_died_is_reaped_with_its_status_before_gunicorn_reaps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = _Rig(monkeypatch, [])
    rig.master.router = running = _Process(rig.events)  # type: ignore[assignment]
    rig.master.retired = stopping = _Process(rig.events, 0)  # type: ignore[assignment]
    rig.arbiter.reap_workers()
    assert rig.events == [f"poll {running.pid}", f"poll {stopping.pid}", "gunicorn reaps"]
    rig.master.router = None  # taken off by a stop on purpose: never started again
    rig.run(5)
    assert rig.starts == [] and rig.arbiter.errors == []


def test_a_router_that_dies_after_a_long_life_is_started_again_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = _Rig(monkeypatch, ["runs", "runs", "runs", "runs"])
    first = rig.master.router = _Process(rig.events, -9)  # type: ignore[assignment]
    rig.run(1)
    assert rig.starts == [100.0]
    assert rig.arbiter.errors == [
        f"statescale: the router (pid {first.pid}) was killed by SIGKILL; starting another"
    ]
    # The new one dies within ROUTER_STABLE seconds, again and again: waits of 1, then 2 s.
    rig.router().returncode = 1
    rig.run(1.5)
    rig.router().returncode = 1
    rig.run(3)
    assert [t - 100.0 for t in rig.starts] == [0.0, 2.0, 4.5]
    assert rig.arbiter.errors[1].endswith("exited with code 1; starting another in 1 s")
    assert rig.arbiter.errors[2].endswith("exited with code 1; starting another in 2 s")
    # One that lived past ROUTER_STABLE is started again at once, the waits forgotten.
    rig.run(hooks.ROUTER_STABLE)
    rig.router().returncode = -15
    rig.run(1)
    assert len(rig.starts) == 4 and rig.starts[3] - rig.starts[2] > hooks.ROUTER_STABLE
    assert rig.arbiter.errors[3].endswith("was killed by SIGTERM; starting another")


def test_a_router_that_cannot_start_again_is_tried_later_and_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = _Rig(monkeypatch, ["dies", "no fork", "dies", "runs"])
    first = rig.master.router = _Process(rig.events, 7)  # type: ignore[assignment]
    rig.run(20)
    assert [t - 100.0 for t in rig.starts] == [0.0, 1.0, 3.0, 7.0]  # waits of 1, 2, 4 s
    assert rig.router().returncode is None  # the fourth runs, and is kept
    errors = rig.arbiter.errors
    assert (
        errors[0]
        == f"statescale: the router (pid {first.pid}) exited with code 7; starting another"
    )
    assert errors[1].endswith("exited at once (status 3); next try in 1 s")
    assert errors[2] == "statescale: [Errno 12] Cannot allocate memory; next try in 2 s"
    assert errors[3].endswith("exited at once (status 3); next try in 4 s")
    assert len(errors) == 4  # each end logged once


# -- what an independent review found (each test failed on the code before) -------------


def test_a_worker_count_changed_behind_the_signals_back_is_undone() -> None:
    # gunicorn's control socket ("gunicornc worker remove 1") set num_workers past the
    # TTIN/TTOU refusal: a slot without a worker held its sessions' requests unanswered.
    events: list[str] = []
    arbiter = _Arbiter(events)
    arbiter.num_workers = 2  # type: ignore[attr-defined]
    for name in ("handle_term", "handle_int", "handle_quit"):
        setattr(arbiter, name, lambda: None)
    master = hooks._Master(Settings.from_env({}))
    master.slots = [object(), object()]  # type: ignore[list-item]
    hooks._keep_the_slots(arbiter, master)
    arbiter.num_workers = 1  # type: ignore[attr-defined]
    arbiter.manage_workers()
    assert arbiter.num_workers == 2  # type: ignore[attr-defined]
    assert events == ["gunicorn manages"] and "undone" in arbiter.errors[0]


def _server(**options: object) -> Any:
    """A stand-in arbiter with gunicorn's defaults for what the sticky hooks check."""
    defaults = {
        "preload_app": False,
        "bind": ["127.0.0.1:8001"],
        "is_ssl": False,
        "proxy_protocol": "off",
        "reuse_port": False,
        "worker_class": object,
    }
    config = type("Config", (), {**defaults, **options})()
    return type("Server", (), {"cfg": config})()


def test_sticky_mode_refuses_a_second_listener_it_would_never_answer() -> None:
    server = _server(bind=["127.0.0.1:8001", "127.0.0.1:8002"])
    with pytest.raises(ConfigError, match="single -b"):
        hooks._prepare_sticky(server, hooks._Master(Settings.from_env({})))


@pytest.mark.parametrize(
    ("options", "routing", "said"),
    [
        ({"is_ssl": True}, "router", "terminate TLS in front"),
        ({"proxy_protocol": "v1"}, "router", "PROXY protocol"),
        ({"reuse_port": True}, "router", "--reuse-port"),
        ({"reuse_port": True}, "workers", "--reuse-port"),
    ],
)
def test_options_the_routing_cannot_serve_are_refused_at_start(
    options: dict[str, object], routing: str, said: str
) -> None:
    # TLS and PROXY lines reached the router, which speaks plain HTTP: every request
    # failed while gunicorn said it listened; --reuse-port crashed the master.
    server = _server(**options)
    settings = Settings.from_env({"STATESCALE_MODE": "affinity", "STATESCALE_ROUTING": routing})
    with pytest.raises(ConfigError, match=said):
        hooks._prepare_sticky(server, hooks._Master(settings))
