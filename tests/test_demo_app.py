"""The demo app's own answers to input a session cannot hold: JSON errors, never a 500."""

from __future__ import annotations

import pytest

from demo_app import create_app

ENV = {"STATESCALE_STORE": "memory", "STATESCALE_SECRET_KEYS": "demo-test-key-0123456789"}


@pytest.mark.parametrize(
    ("path", "status", "says"),
    [
        pytest.param("/api/incr?key=%00", 400, "without NUL", id="nul-key"),
        pytest.param("/api/set?key=a%00b&value=1", 400, "without NUL", id="nul-in-key"),
        pytest.param("/api/set?key=big&value=" + "x" * 70_000, 413, "over the limit", id="size"),
        pytest.param("/api/incr", 400, "?key=NAME", id="no-key"),
        pytest.param("/api/login", 400, "?user=NAME", id="no-user"),
    ],
)
def test_bad_input_is_a_json_error(path: str, status: int, says: str) -> None:
    client = create_app(ENV).test_client()
    client.post("/api/set?key=kept&value=1")
    response = client.post(path)
    assert response.status_code == status
    assert response.is_json and says in response.json["error"]
    assert client.get("/api/session").json["data"] == {"kept": "1"}  # nothing lost
