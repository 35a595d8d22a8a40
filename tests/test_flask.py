from __future__ import annotations

import pytest
from flask import Flask, session

from statescale.exceptions import ConfigError
from statescale.flask import StateScale
from statescale.stores import MemoryStore
from statescale.stores.redis import RedisStore
from tests.conftest import SECRET


def make_app(**config: object) -> Flask:
    app = Flask(__name__)
    app.config.update(STATESCALE_COOKIE_SECURE=False, **config)

    @app.post("/incr")
    def incr() -> dict[str, int]:
        session["n"] = session.get("n", 0) + 1
        return {"n": session["n"]}

    @app.get("/peek")
    def peek() -> dict[str, object]:
        return dict(session)

    return app


def test_flask_session_is_backed_by_redis(redis_url: str) -> None:
    app = make_app(STATESCALE_REDIS_URL=redis_url, STATESCALE_SECRET_KEYS=[SECRET])
    ext = StateScale(app)
    assert ext.middleware is not None and isinstance(ext.middleware.store, RedisStore)
    client = app.test_client()
    assert [client.post("/incr").json for _ in range(3)] == [{"n": 1}, {"n": 2}, {"n": 3}]
    other = make_app(STATESCALE_REDIS_URL=redis_url, STATESCALE_SECRET_KEYS=[SECRET])
    StateScale(other)  # a second "worker": same store, same keys
    cookie = client.get_cookie("statescale")
    assert cookie is not None
    peer = other.test_client()
    peer.set_cookie("statescale", cookie.value)
    assert peer.get("/peek").json == {"n": 3}


def test_secret_key_and_fallbacks_sign_when_no_statescale_keys() -> None:
    app = make_app(
        SECRET_KEY="flask-secret-0123456789", SECRET_KEY_FALLBACKS=["old-flask-secret-0123"]
    )
    ext = StateScale(app, store=MemoryStore())
    assert ext.middleware is not None
    assert ext.middleware.signer.unsign(ext.middleware.signer.sign("a" * 43)) is not None


def test_no_keys_at_all_uses_the_development_key_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    StateScale(make_app(), store=MemoryStore())
    assert "PUBLIC development key" in caplog.text


def test_store_outage_is_503_through_flask(own_redis: object) -> None:
    from statescale.embedded import EmbeddedRedis

    assert isinstance(own_redis, EmbeddedRedis)
    app = make_app(STATESCALE_REDIS_URL=own_redis.url, STATESCALE_SECRET_KEYS=[SECRET])
    StateScale(app)
    client = app.test_client()
    client.post("/incr")
    own_redis.stop()
    response = client.post("/incr")
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"


def test_init_app_twice_is_an_error() -> None:
    app = make_app()
    StateScale(app, store=MemoryStore())
    with pytest.raises(ConfigError):
        StateScale(app, store=MemoryStore())
