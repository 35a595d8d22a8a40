"""The README's promises: its commands, its examples and its configuration table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import Client

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command() -> None:
    test_command = blocks("bash")[1].strip()
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()


def run_example(source: str, redis_url: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(
        compile(source.replace("redis://localhost:6379/0", redis_url), "README", "exec"), namespace
    )
    return namespace


def test_the_wsgi_example(redis_url: str) -> None:
    wsgi, _flask, *_client = blocks("python")
    app = run_example(wsgi, redis_url)["app"]
    client = Client(app)
    # The example keeps the secure default; a Secure cookie would not come back over
    # http://localhost in werkzeug's client, so send it back by hand.
    first = client.get("/")
    cookie = first.headers["Set-Cookie"].split(";", 1)[0]
    assert first.text == "visit 1\n"
    assert client.get("/", headers={"Cookie": cookie}).text == "visit 2\n"


def test_the_flask_example(redis_url: str) -> None:
    _wsgi, flask_source, *_client = blocks("python")
    app = run_example(flask_source, redis_url)["app"]
    client = app.test_client()
    first = client.post("/cart/apple")
    cookie = first.headers["Set-Cookie"].split(";", 1)[0]
    assert first.json == {"cart": ["apple"]}
    second = client.post("/cart/pear", headers={"Cookie": cookie})
    assert second.json == {"cart": ["apple", "pear"]}


def test_the_configuration_table_is_what_settings_read() -> None:
    documented = set(re.findall(r"^\| `(STATESCALE_[A-Z_]+)`", README, flags=re.M))
    source = (ROOT / "statescale" / "config.py").read_text()
    read = set(re.findall(r'"(STATESCALE_[A-Z_]+)"', source))
    assert documented == read


@pytest.mark.parametrize("extra", ["redis", "flask", "gunicorn", "embedded", "demo", "dev"])
def test_readme_extras_exist(extra: str) -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    if f"[{extra}" in README or f",{extra}" in README:
        assert re.search(rf"^{extra} = \[", pyproject, flags=re.M)


def test_every_test_the_security_review_names_exists() -> None:
    review = (ROOT / "docs" / "SECURITY.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", review)
    assert len(named) > 20
    missing = [
        f"{path}::{name}"
        for path, name in named
        if not re.search(rf"^def {name}\(", (ROOT / path).read_text(), flags=re.M)
    ]
    assert missing == []
