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


# -- what an independent review found (each test failed on the code before) -------------


@pytest.mark.parametrize("blank", [None, "", " "])
def test_flasks_own_secret_key_alone_signs(
    blank: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    # Flask 3.1's default SECRET_KEY_FALLBACKS is None: StateScale(app) raised TypeError.
    # A blank STATESCALE_SECRET_KEYS (" ") fell back to the public development key.
    app = make_app(SECRET_KEY="flask-secret-0123456789", STATESCALE_SECRET_KEYS=blank)
    assert app.config["SECRET_KEY_FALLBACKS"] is None  # as Flask leaves it
    StateScale(app, store=MemoryStore())
    assert app.test_client().post("/incr").json == {"n": 1}
    assert "development key" not in caplog.text


def test_a_bytes_secret_key_is_the_same_key_as_its_text() -> None:
    # It was used as the text "b'...'": instances configured with the text refused it.
    store = MemoryStore()
    as_bytes, as_text = make_app(SECRET_KEY=SECRET.encode()), make_app(SECRET_KEY=SECRET)
    StateScale(as_bytes, store=store)
    StateScale(as_text, store=store)
    client = as_bytes.test_client()
    client.post("/incr")
    peer = as_text.test_client()
    cookie = client.get_cookie("statescale")
    assert cookie is not None
    peer.set_cookie("statescale", cookie.value)
    assert peer.get("/peek").json == {"n": 1}


def test_what_cannot_be_stored_goes_through_flasks_error_handling() -> None:
    # A value changed in place that cannot be stored was found when the response
    # started, outside Flask: the server's bare 500; Flask's log, signals and 500
    # handler never saw it.
    import datetime

    from flask import got_request_exception

    app = make_app(STATESCALE_SECRET_KEYS=[SECRET], STATESCALE_MAX_SIZE=200)
    seen: list[str] = []

    def record(sender: object, exception: Exception, **extra: object) -> None:
        seen.append(type(exception).__name__)

    got_request_exception.connect(record, app)

    @app.post("/when")
    def when() -> str:
        session["n"] = 7
        session.setdefault("log", []).append(datetime.date.today())  # not JSON
        return "ok"

    @app.post("/grow")
    def grow() -> str:
        session.setdefault("log", []).append("x" * 300)  # over max_size
        return "ok"

    @app.errorhandler(500)
    def broken(exc: Exception) -> tuple[str, int]:
        return "the app's own 500 page", 500

    StateScale(app, store=MemoryStore())
    client = app.test_client()
    client.post("/incr")
    for path in ("/when", "/grow"):
        reply = client.post(path)
        assert (reply.status_code, reply.text) == (500, "the app's own 500 page")
    assert seen == ["SerializationError", "SessionTooLarge"]
    assert client.get("/peek").json == {"n": 1}  # nothing of either request was saved


def test_session_transaction_and_test_request_context_work() -> None:
    from flask import session as flask_session

    app = make_app(STATESCALE_SECRET_KEYS=[SECRET])
    StateScale(app, store=MemoryStore())
    client = app.test_client()
    with client.session_transaction() as prepared:
        prepared["n"] = 41
    assert client.post("/incr").json == {"n": 42}
    with client.session_transaction() as seen:
        assert seen["n"] == 42
    with app.test_request_context("/"):
        assert flask_session.get("n") is None  # no cookie: a new session
        flask_session["n"] = 1  # no error


def test_clear_before_login_gives_a_new_id() -> None:
    # Flask's login idiom (session.clear(), then the user in) kept the ID: a cookie
    # planted before login was logged in too (session fixation).
    app = make_app(STATESCALE_SECRET_KEYS=[SECRET])

    @app.post("/login")
    def login() -> str:
        session.clear()
        session["user"] = "ada"
        return "ok"

    @app.post("/logout")
    def logout() -> str:
        session.clear()
        return "ok"

    StateScale(app, store=MemoryStore())
    attacker = app.test_client()
    attacker.post("/incr")
    planted = attacker.get_cookie("statescale")
    assert planted is not None
    victim = app.test_client()
    victim.set_cookie("statescale", planted.value)
    victim.post("/login")
    after = victim.get_cookie("statescale")
    assert after is not None and after.value != planted.value
    assert victim.get("/peek").json == {"user": "ada"}
    assert attacker.get("/peek").json == {}  # the planted record is gone
    reply = victim.post("/logout")
    assert any("Expires=Thu, 01 Jan 1970" in h for h in reply.headers.getlist("Set-Cookie"))


def test_flasks_cookie_settings_are_followed_unless_statescales_are_set() -> None:
    app = make_app(
        STATESCALE_SECRET_KEYS=[SECRET],
        SESSION_COOKIE_NAME="app_sid",
        SESSION_COOKIE_PATH="/shop",
        SESSION_COOKIE_SAMESITE="Strict",
    )
    StateScale(app, store=MemoryStore())
    [cookie] = app.test_client().post("/incr").headers.getlist("Set-Cookie")
    assert cookie.startswith("app_sid=") and "Path=/shop" in cookie
    assert "SameSite=Strict" in cookie
    app = make_app(
        STATESCALE_SECRET_KEYS=[SECRET],
        SESSION_COOKIE_NAME="app_sid",
        STATESCALE_COOKIE_NAME="mine",
        STATESCALE_COOKIE_SAMESITE="strict",
        STATESCALE_COOKIE_HTTPONLY="0",
    )
    StateScale(app, store=MemoryStore())
    [cookie] = app.test_client().post("/incr").headers.getlist("Set-Cookie")
    assert cookie.startswith("mine=") and "SameSite=Strict" in cookie
    assert "HttpOnly" not in cookie


def test_one_extension_on_two_apps_keeps_each_apps_own() -> None:
    ext = StateScale(store=MemoryStore())
    first = make_app(STATESCALE_SECRET_KEYS=[SECRET], STATESCALE_COOKIE_NAME="first")
    second = make_app(STATESCALE_SECRET_KEYS=[SECRET], STATESCALE_COOKIE_NAME="second")
    ext.init_app(first)
    ext.init_app(second)
    assert first.extensions["statescale"].middleware.cookie.name == "first"
    assert second.extensions["statescale"].middleware.cookie.name == "second"


def test_a_session_copy_is_a_plain_dict() -> None:
    app = make_app(STATESCALE_SECRET_KEYS=[SECRET])

    @app.post("/copy")
    def copy() -> dict[str, object]:
        session["cart"] = ["a"]
        snapshot = session.copy()
        snapshot["cart"].append("b")  # changes nothing stored
        return {"copy": snapshot, "is_dict": type(snapshot) is dict}

    StateScale(app, store=MemoryStore())
    client = app.test_client()
    assert client.post("/copy").json == {"copy": {"cart": ["a", "b"]}, "is_dict": True}
    assert client.get("/peek").json == {"cart": ["a"]}
