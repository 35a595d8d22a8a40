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


def test_answers_name_the_session_by_a_hash_and_its_owner_from_the_first() -> None:
    # The page showed the first 8 characters of the session ID (48 of its bits), never
    # updated them, and the answer that created a session said its owner was null.
    from demo_app import create_app, tag

    app = create_app(
        {"STATESCALE_STORE": "memory", "STATESCALE_COOKIE_SECURE": "0",
         "STATESCALE_SECRET_KEYS": "k" * 32, "STATESCALE_MODE": "sticky",
         "STATESCALE_NODE": "a", "STATESCALE_BACKENDS": "a=127.0.0.1:1,b=127.0.0.1:2"}
    )  # fmt: skip
    client = app.test_client()
    first = client.post("/api/incr?key=n").get_json()
    assert first["owner"] == "a" and first["session"] is None  # its ID comes at the commit
    second = client.post("/api/incr?key=n").get_json()
    assert second["owner"] == "a" and second["session"] is not None
    cookie = client.get_cookie("statescale")
    assert cookie is not None
    session_id = cookie.value.partition(".")[0]
    assert second["session"] == tag(session_id) and second["session"] not in session_id
    page = client.get("/").get_data(as_text=True)
    assert f'<code id="sid">{second["session"]}</code>' in page
    out = client.post("/api/logout").get_json()
    assert out["owner"] is None and out["session"] is None
