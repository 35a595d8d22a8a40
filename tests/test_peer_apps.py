"""The benchmarks' floor apps answer the routes every configuration serves as the
others do: a user's increments count on, and what it set reads back."""

from __future__ import annotations

import pytest

from benchmarks.rig import peer_apps


@pytest.mark.parametrize("name", ["floor1_app", "floor2_app"])
def test_a_floor_keeps_a_users_counter(
    name: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STATESCALE_REDIS_URL", redis_url)
    app = getattr(peer_apps, name)
    try:
        user, other = app.test_client(), app.test_client()
        reply = user.post("/api/set?key=user&value=ada").json
        assert (reply["key"], reply["value"]) == ("user", "ada")
        other.post("/api/set?key=user&value=bob")
        assert [user.post("/api/incr?key=n").json["value"] for _ in range(3)] == [1, 2, 3]
        assert other.post("/api/incr?key=n").json["value"] == 1
        data = user.get("/api/session").json["data"]
        assert data["n"] == "3"
        if name == "floor2_app":  # read from Redis: what /api/set stored too
            assert data["user"] == "ada"
    finally:
        app.extensions["floor_redis"].close()
