"""The balancer registry: one module per balancer, found by name, each with a ring, a
configuration writer and a command; and the one parser of backend specs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from statescale.exceptions import ConfigError
from statescale.routing import balancers
from statescale.routing.backends import (
    Backend,
    backends_text,
    parse_backends,
    parse_backends_text,
    read_backends_file,
)
from statescale.signing import SEPARATOR, SessionSigner, routing_key

BACKENDS = parse_backends(["a=127.0.0.1:9001", "b=127.0.0.1:9002*2", "c=127.0.0.1:9003"])


def test_the_registry_names_every_balancer() -> None:
    assert balancers.names() == ("haproxy", "nginx", "statescale")
    with pytest.raises(ConfigError, match="use one of haproxy, nginx, statescale"):
        balancers.get("envoy")


@pytest.mark.parametrize("name", ["haproxy", "nginx", "statescale"])
def test_each_balancer_has_a_ring_a_config_and_a_command(name: str, tmp_path: Path) -> None:
    balancer = balancers.get(name)
    ring = balancer.ring(BACKENDS)
    owners = {ring.owner(f"session{i}") for i in range(300)}
    assert owners == {"a", "b", "c"}
    assert ring.owner("session1", down=[ring.owner("session1")]) != ring.owner("session1")
    text = balancer.config(BACKENDS, listen="127.0.0.1:8080", cookie="sid")
    assert all(b.address in text or b.spec in text for b in BACKENDS)
    config = tmp_path / balancer.config_name
    command = balancer.command(config, listen="127.0.0.1:8080", cookie="sid")
    assert command and str(config) in command


def test_the_routing_key_rule_is_spelled_from_the_signers_separator() -> None:
    value = SessionSigner(["k" * 32]).sign("the-session-id-0123456789")
    assert value.count(SEPARATOR) == 1
    assert routing_key(value) == "the-session-id-0123456789"
    nginx = balancers.get("nginx").config(BACKENDS, listen="127.0.0.1:1", cookie="sid")
    haproxy = balancers.get("haproxy").config(BACKENDS, listen="127.0.0.1:1", cookie="sid")
    sid = r"(?<statescale_sid>[A-Za-z0-9_-]+)" + re.escape(SEPARATOR)
    assert sid in nginx
    assert r"(?<sid>[A-Za-z0-9_-]+)" + re.escape(SEPARATOR) in haproxy


def test_a_new_balancer_is_one_new_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "envoy.py").write_text(
        "from statescale.routing.balancers._base import Balancer\n"
        "from statescale.routing.ring import Ring\n"
        "BALANCER = Balancer(name='envoy', summary='envoy ring_hash', node_key=lambda b: b.name,\n"
        "    make_ring=Ring, write_config=lambda b, listen, cookie: 'conf',\n"
        "    config_name='envoy.yaml', run=lambda path, listen, cookie: ['envoy', str(path)])\n"
    )
    monkeypatch.setattr(balancers, "__path__", [*balancers.__path__, str(tmp_path)])
    balancers._registry.cache_clear()
    try:
        assert balancers.names() == ("envoy", "haproxy", "nginx", "statescale")
        assert balancers.get("envoy").ring(BACKENDS).owner("x") in {"a", "b", "c"}
    finally:
        monkeypatch.undo()
        balancers._registry.cache_clear()
        sys.modules.pop("statescale.routing.balancers.envoy", None)
    assert "envoy" not in balancers.names()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param("n1=10.0.0.1:8000", Backend("n1", "10.0.0.1", 8000), id="plain"),
        pytest.param("n1=h:8000*3", Backend("n1", "h", 8000, 3), id="weight"),
        pytest.param(" n1=h:1 ", Backend("n1", "h", 1), id="spaces"),
    ],
)
def test_backend_specs(spec: str, expected: Backend) -> None:
    assert Backend.parse(spec) == expected
    assert Backend.parse(expected.spec) == expected


def test_unix_socket_backends_are_for_the_routers_command_line_only() -> None:
    unix = Backend("w0", "unix:/run/w0.sock", 0)
    assert Backend.parse("w0=unix:/run/w0.sock", unix=True) == unix
    assert Backend.parse(unix.spec, unix=True) == unix and unix.unix == "/run/w0.sock"
    with pytest.raises(ConfigError, match="no Unix sockets here"):
        Backend.parse("w0=unix:/run/w0.sock")  # balancers, nodes, admin calls, files


@pytest.mark.parametrize(
    "spec",
    [
        "n1",
        "n1=host",
        "=h:1",
        "n1=h:port",
        "n 1=h:1",
        "n1=h:1*x",
        "n1=h:1*0",
        "n1=h:70000",
        "n1=unix:/s",
    ],
)
def test_bad_backend_specs_say_the_format(spec: str) -> None:
    with pytest.raises(ConfigError, match=r"NAME=HOST:PORT|weight|port"):
        Backend.parse(spec)


def test_backends_files_round_trip_and_refuse_duplicates(tmp_path: Path) -> None:
    text = "# the fleet\n\na=127.0.0.1:9001  # first\n" + backends_text(BACKENDS[1:])
    assert parse_backends_text(text) == BACKENDS
    path = tmp_path / "backends"
    path.write_text(backends_text(BACKENDS))
    assert read_backends_file(path) == BACKENDS
    with pytest.raises(ConfigError, match="distinct"):
        parse_backends(["a=h:1", "a=h:2"])
    with pytest.raises(ConfigError, match="at least one"):
        parse_backends_text("# nobody\n")
    with pytest.raises(ConfigError, match="cannot read"):
        read_backends_file(tmp_path / "missing")


# -- what an independent review found (each test failed on the code before) -------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:1; } server { listen 127.0.0.1:2; }",  # nginx directives
        "127.0.0.1:1\n    http-request return status 200",  # an HAProxy line
        "h h",
        "",
    ],
)
def test_a_host_that_would_write_configuration_is_refused(host: str) -> None:
    # Any instance can register; its address went into nginx's and HAProxy's
    # configuration verbatim, and the balancers' checks accepted what it added.
    with pytest.raises(ConfigError):
        Backend("evil", host, 1)
    with pytest.raises(ConfigError):
        Backend.parse(f"evil={host}:1")
    assert Backend("ok", "[::1]", 1).address == "[::1]:1"


def test_more_weight_than_haproxy_takes_is_refused() -> None:
    with pytest.raises(ConfigError, match="from 1 to 256"):
        Backend.parse("a=h:1*257")
    with pytest.raises(ConfigError, match="from 1 to 256"):
        Backend("a", "h", 1, 300)


def test_names_sharing_an_haproxy_id_and_cookie_names_a_config_cannot_take(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from statescale.cli import main

    args = ["lb-config", "haproxy", "--backend", "node862=h:1", "--backend", "node1593=h:2"]
    assert main(args) == 2  # HAProxy would refuse it: two servers with one id
    assert "share an HAProxy server id" in capsys.readouterr().err
    for kind in ("nginx", "haproxy"):
        with pytest.raises(ConfigError, match="cookie named"):
            balancers.get(kind).config(BACKENDS, listen="127.0.0.1:1", cookie="a#b")
    with pytest.raises(ConfigError, match="addresses must be distinct"):
        parse_backends(["a=h:1", "b=h:1"])  # nginx's ring would merge them


def test_a_pid_file_left_behind_names_no_balancer_to_signal(tmp_path: Path) -> None:
    # HAProxy's pid file stays after it stops; its pid, reused by another process,
    # got SIGUSR2 (which ends a process that does not handle it).
    import subprocess

    from statescale.routing.balancers import haproxy, nginx

    other = subprocess.Popen(["sleep", "30"])
    try:
        config = tmp_path / "haproxy.cfg"
        for name in ("haproxy.pid", "nginx.pid"):
            (tmp_path / name).write_text(f"{other.pid}\n")
        assert not haproxy.reload(config) and not nginx.reload(tmp_path / "nginx.conf")
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_lb_sync_once_fails_and_says_why_when_the_configuration_is_refused(
    tmp_path: Path,
) -> None:
    import subprocess

    members = tmp_path / "members"
    members.write_text("a=no-such-host.invalid:9001\n")  # a name nobody resolves
    for kind in ("haproxy", "nginx"):
        config = tmp_path / kind / balancers.get(kind).config_name
        config.parent.mkdir()
        done = subprocess.run(
            [sys.executable, "-m", "statescale", "lb-sync", kind, "--once",
             "--registry", f"file://{members}", "--config", str(config)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 2, done
        assert "no-such-host.invalid" in done.stdout and "Traceback" not in done.stderr
        assert not config.exists() and not config.with_name(config.name + ".new").exists()
