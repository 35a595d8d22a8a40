"""The middleware in process (werkzeug's test client) against memory and real Redis.
Numbers in the test names refer to docs/RELIABILITY.md."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

import pytest
import redis
from werkzeug.test import Client, TestResponse

from statescale import CookieOptions, StateScaleMiddleware, get_session
from statescale.embedded import EmbeddedRedis
from statescale.exceptions import SessionError, SessionTooLarge, StoreUnavailable
from statescale.middleware import UNAVAILABLE_BODY
from statescale.session import Changes, Session
from statescale.signing import SessionSigner
from statescale.stores import MemoryStore
from statescale.stores.redis import RedisStore
from tests.conftest import OLD_SECRET, SECRET, Clock, Counting, make_store

COOKIE = CookieOptions(secure=False)


def demo(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    session = get_session(environ)
    path = environ["PATH_INFO"]
    args = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    body: object = {}
    if path == "/read":
        body = dict(session)
    elif path == "/set":
        session[args["k"]] = args.get("v", "")
    elif path == "/del":
        session.pop(args["k"], None)
    elif path == "/incr":
        session[args["k"]] = session.get(args["k"], 0) + 1
        body = session[args["k"]]
    elif path == "/login":
        session.regenerate()
        session["user"] = args["user"]
    elif path == "/logout":
        session.invalidate()
    elif path == "/bad":
        session["when"] = object()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]


def lazy_demo(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    """A generator app: it touches the session and starts its response on first next()."""
    get_session(environ)["lazy"] = True
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"ok"


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, clock: Clock) -> Counting:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    return Counting(make_store(request.param, clock, url))


def client_for(
    store: Any, keys: list[str] | None = None, app: Any = demo, **options: Any
) -> Client:
    mw = StateScaleMiddleware(app, store, secret_keys=keys or [SECRET], cookie=COOKIE, **options)
    return Client(mw, use_cookies=False)


def cookie_value(response: TestResponse, name: str = "statescale") -> str | None:
    for header in response.headers.getlist("Set-Cookie"):
        key, _, rest = header.split(";", 1)[0].partition("=")
        if key == name:
            return rest or None
    return None


def call(client: Client, path: str, cookie: str | None = None) -> TestResponse:
    headers = {"Cookie": f"statescale={cookie}"} if cookie is not None else {}
    return client.get(path, headers=headers)


def test_01_read_without_cookie_costs_nothing(store: Counting) -> None:
    response = call(client_for(store), "/read")
    assert response.status_code == 200 and response.json == {}
    assert "Set-Cookie" not in response.headers
    assert store.calls == []


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("tampered", id="tampered"),
        pytest.param("garbage!!", id="garbage"),
        pytest.param("", id="empty"),
        pytest.param("x" * 8192, id="8kb"),
        pytest.param("a\x00b", id="nul"),
        pytest.param("\xff\xfe", id="non-utf8"),
        pytest.param('"quoted"', id="quotes"),
    ],
)
def test_02_bad_cookies_are_anonymous_without_a_round_trip(store: Counting, value: str) -> None:
    if value == "tampered":
        good = SessionSigner([SECRET]).sign("a" * 43)
        value = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
    response = call(client_for(store), "/read", value)
    assert response.status_code == 200 and response.json == {}
    assert store.calls == []


def test_03_unknown_signed_id_is_never_created(store: Counting) -> None:
    presented = "u" * 43
    cookie = SessionSigner([SECRET]).sign(presented)
    client = client_for(store)
    response = call(client, "/set?k=a&v=1", cookie)
    new = cookie_value(response)
    assert new is not None and not new.startswith(presented)
    assert store.inner.load(presented) is None
    assert call(client, "/read", new).json == {"a": "1"}


def test_04_key_rotation(store: Counting) -> None:
    old_client = client_for(store, [OLD_SECRET])
    cookie = cookie_value(call(old_client, "/set?k=a&v=1"))
    rotated = client_for(store, [OLD_SECRET, SECRET])
    response = call(rotated, "/read", cookie)
    assert response.json == {"a": "1"}
    reissued = cookie_value(response)
    assert reissued is not None and reissued != cookie
    assert SessionSigner([SECRET]).unsign(reissued) is not None
    assert call(client_for(store, [SECRET]), "/read", cookie).json == {}  # old key gone
    assert call(client_for(store, [SECRET]), "/read", reissued).json == {"a": "1"}


def test_06_cookie_attributes(store: Counting) -> None:
    client = Client(StateScaleMiddleware(demo, store, secret_keys=[SECRET]), use_cookies=False)
    header = call(client, "/set?k=a").headers.getlist("Set-Cookie")[-1]
    for attribute in ("HttpOnly", "Secure", "Path=/", "SameSite=Lax"):
        assert attribute in header
    assert call(client, "/set?k=a").headers["Vary"] == "Cookie"


def test_07_logout_deletes_and_expires(store: Counting) -> None:
    client = client_for(store)
    cookie = cookie_value(call(client, "/set?k=a&v=1"))
    response = call(client, "/logout", cookie)
    assert all("Max-Age=0" in h for h in response.headers.getlist("Set-Cookie"))
    assert call(client, "/read", cookie).json == {}  # replaying the old cookie


def test_08_login_regenerates(store: Counting) -> None:
    client = client_for(store)
    before = cookie_value(call(client, "/set?k=cart&v=3"))
    after = cookie_value(call(client, "/login?user=ada", before))
    assert after is not None and after != before
    assert call(client, "/read", after).json == {"cart": "3", "user": "ada"}
    assert call(client, "/read", before).json == {}  # the old record is gone


def test_09_unserializable_value_names_the_key_store_unchanged(store: Counting) -> None:
    client = client_for(store)
    cookie = cookie_value(call(client, "/set?k=a&v=1"))
    store.calls.clear()
    with pytest.raises(TypeError, match="'when'"):
        call(client, "/bad", cookie)
    assert "save" not in store.calls and "create" not in store.calls
    assert call(client, "/read", cookie).json == {"a": "1"}


def test_10_corrupt_redis_data_is_dropped_and_logged(
    redis_url: str, raw_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStore.from_url(redis_url)
    client = client_for(store)
    cookie = cookie_value(call(client, "/set?k=a&v=1"))
    assert cookie is not None
    sid = SessionSigner([SECRET]).unsign(cookie)
    assert sid is not None
    pickled = b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00\x8c\x07payload\x94."
    raw_redis.hset(store.key(sid.session_id), "a", pickled)
    with caplog.at_level(logging.WARNING, "statescale"):
        response = call(client, "/read", cookie)
    assert response.status_code == 200 and response.json == {}
    assert "not valid JSON" in caplog.text


def test_11_too_large_writes_nothing(store: Counting) -> None:
    client = client_for(store, max_size=100)
    with pytest.raises(Exception, match="over the limit"):
        call(client, "/set?k=a&v=" + "x" * 200)
    assert "create" not in store.calls


def test_12_absolute_lifetime(clock: Clock) -> None:
    store = make_store("memory", clock, idle_timeout=100, absolute_lifetime=200)
    client = client_for(store)
    cookie = cookie_value(call(client, "/set?k=a&v=1"))
    for _ in range(3):
        clock.now += 50
        assert call(client, "/read", cookie).json == {"a": "1"}
    clock.now += 55  # 205 s old, 55 s idle: past the absolute lifetime, however busy
    assert call(client, "/read", cookie).json == {}


def test_13_14_parallel_requests_keep_every_key(redis_url: str) -> None:
    client = client_for(RedisStore.from_url(redis_url))
    cookie = cookie_value(call(client, "/set?k=doomed&v=1"))
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(100):
                call(client, f"/set?k=t{n}-{i}&v={i}", cookie)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    call(client, "/del?k=doomed", cookie)
    for thread in threads:
        thread.join()
    data = call(client, "/read", cookie).json
    assert not errors
    assert len(data) == 400 and "doomed" not in data


def test_locking_makes_increments_exact(redis_url: str) -> None:
    client = client_for(RedisStore.from_url(redis_url), locking=True)
    cookie = cookie_value(call(client, "/incr?k=n"))

    def worker() -> None:
        for _ in range(25):
            call(client, "/incr?k=n", cookie)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert call(client, "/read", cookie).json == {"n": 101}


@pytest.mark.parametrize(
    "app", [pytest.param(demo, id="plain"), pytest.param(lazy_demo, id="generator")]
)
def test_16_store_down_is_503_then_recovers(
    own_redis: EmbeddedRedis, app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = client_for(RedisStore.from_url(own_redis.url), app=app)
    path = "/set?k=a&v=1"
    cookie = cookie_value(call(client, path))
    own_redis.stop()
    with caplog.at_level(logging.ERROR, "statescale"):
        response = call(client, path, cookie)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert "Set-Cookie" not in response.headers  # 18: no cookie cleared or rotated
    assert "answering 503" in caplog.text and "ConnectionError" in caplog.text
    own_redis.start()
    response = call(client, path)
    assert response.status_code == 200 and cookie_value(response)


def test_17_store_hung_is_503_within_budget(own_redis: EmbeddedRedis) -> None:
    client = client_for(RedisStore.from_url(own_redis.url, timeout=0.3, local_cache=0))
    cookie = cookie_value(call(client, "/set?k=a&v=1"))
    own_redis.pause()
    try:
        started = time.monotonic()
        assert call(client, "/read", cookie).status_code == 503
        assert time.monotonic() - started < 1.5
        started = time.monotonic()  # the breaker is open: the next one fails at once
        assert call(client, "/read", cookie).status_code == 503
        assert time.monotonic() - started < 0.3
    finally:
        own_redis.resume()
    time.sleep(0.3)  # the next probe, a quarter second on, finds Redis back
    assert call(client, "/read", cookie).json == {"a": "1"}


def test_17_store_hung_with_local_cache_serves_cached_reads_and_503s_writes(
    own_redis: EmbeddedRedis,
) -> None:
    # Within the lease (a second after Redis last answered on the subscription), a copy
    # this process holds and Redis has not invalidated is still the truth; writes cannot
    # be, and fail fast. (Past the lease: test_subscription's lease tests.)
    client = client_for(RedisStore.from_url(own_redis.url, timeout=0.3))
    cookie = cookie_value(call(client, "/set?k=a&v=1"))
    other = cookie_value(call(client_for(RedisStore.from_url(own_redis.url)), "/set?k=b&v=2"))
    # A new session is read from Redis on its client's return (which subscribes this
    # process to the changes); the next read caches it.
    for _ in range(2):
        assert call(client, "/read", cookie).json == {"a": "1"}
    own_redis.pause()
    try:
        started = time.monotonic()
        assert call(client, "/read", cookie).json == {"a": "1"}
        assert call(client, "/set?k=a&v=2", cookie).status_code == 503
        assert call(client, "/read", other).status_code == 503  # not cached here
        assert time.monotonic() - started < 3.5
    finally:
        own_redis.resume()
    # The timed-out write closed its connection, and the copies went with it (Redis no
    # longer tracks what that connection read). The process recovers by itself, within
    # the breaker's probe interval; the write may have landed: old or new, never a mix.
    deadline = time.monotonic() + 2
    while (reply := call(client, "/read", cookie)).status_code == 503:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert reply.json in ({"a": "1"}, {"a": "2"})


def test_19_failed_commit_sends_no_cookie_for_an_unsaved_id(own_redis: EmbeddedRedis) -> None:
    client = client_for(RedisStore.from_url(own_redis.url))
    own_redis.stop()
    response = call(client, "/set?k=a&v=1")  # a new session: the write is the first contact
    assert response.status_code == 503
    assert "Set-Cookie" not in response.headers


@pytest.mark.parametrize("kind", ["memory", "redis", "redis-cached"])
def test_28_a_write_to_a_vanished_record_keeps_only_what_it_wrote(
    kind: str, clock: Clock, request: pytest.FixtureRequest
) -> None:
    """Flushed, evicted or deleted by an operator (a forced logout) under a live cookie:
    the write is not acknowledged as stored in the old record; what it wrote becomes a
    fresh session under a new ID, and nothing it did not write comes back."""
    if kind == "redis-cached":
        url = request.getfixturevalue("redis_url")
        store: Any = RedisStore.from_url(url)  # with this process's copies
    else:
        url = request.getfixturevalue("redis_url") if kind == "redis" else None
        store = make_store(kind, clock, url)
    client = client_for(store)
    jar: dict[str, str] = {}

    def send(path: str) -> TestResponse:  # a browser: every cookie back, version too
        header = "; ".join(f"{k}={v}" for k, v in jar.items())
        response = client.get(path, headers={"Cookie": header} if jar else {})
        for name in ("statescale", "statescale_v"):
            value = cookie_value(response, name)
            if value is not None:
                jar[name] = value
        return response

    send("/set?k=user&v=ada")
    for _ in range(5):
        send("/incr?k=c")
    assert send("/read").json == {"user": "ada", "c": 5}
    cookie = jar["statescale"]
    signed = SessionSigner([SECRET]).unsign(cookie)
    assert signed is not None
    if kind == "memory":
        store.delete(signed.session_id)
    else:  # behind statescale's back: no change message reaches the copies
        redis.Redis.from_url(url).delete(store.key(signed.session_id))
    response = send("/incr?k=c")
    answered = response.json
    assert response.status_code == 200 and jar["statescale"] != cookie
    assert send("/read").json == {"c": answered}  # exactly what it wrote, no "user"
    assert send("/incr?k=c").json == answered + 1
    assert call(client, "/read", cookie).json == {}  # the old cookie: nothing


def test_24_memory_store_under_several_workers_warns(
    caplog: pytest.LogCaptureFixture, clock: Clock
) -> None:
    client = client_for(make_store("memory", clock))
    with caplog.at_level(logging.WARNING, "statescale"):
        client.get("/read", environ_overrides={"wsgi.multiprocess": True})
    assert "several worker processes" in caplog.text


def test_a_forged_cookie_is_logged_with_the_address_never_the_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = client_for(MemoryStore())
    forged = "x" * 43 + ".forged-signature"
    with caplog.at_level(logging.WARNING, "statescale"):
        response = client.get(
            "/read",
            headers={"Cookie": f"statescale={forged}"},
            environ_base={"REMOTE_ADDR": "203.0.113.9"},
        )
    assert response.json == {}
    assert "bad signature from 203.0.113.9" in caplog.text
    assert forged not in caplog.text and "x" * 43 not in caplog.text


def test_a_response_that_sets_the_session_cookie_is_not_cached_for_others() -> None:
    def cached_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        get_session(environ)["a"] = 1
        start_response("200 OK", [("Cache-Control", "public, max-age=60")])
        return [b"ok"]

    fresh = call(client_for(MemoryStore()), "/set?k=a")
    assert fresh.headers["Cache-Control"] == 'private, no-cache="Set-Cookie"'
    assert call(client_for(MemoryStore()), "/read").headers.get("Cache-Control") is None
    own = call(client_for(MemoryStore(), app=cached_app), "/")
    # Not even where the app says public: the browser may keep it, no shared cache.
    assert own.headers.getlist("Cache-Control") == ["private, max-age=60"]


def test_the_session_life_cycle_is_logged_by_a_keyed_hash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = client_for(MemoryStore())
    with caplog.at_level(logging.INFO, "statescale.sessions"):
        first = cookie_value(call(client, "/set?k=a&v=1"))
        second = cookie_value(call(client, "/login?user=ada", first))
        call(client, "/logout", second)
    lines = [r.getMessage() for r in caplog.records if r.name == "statescale.sessions"]
    assert [line.split()[2] for line in lines] == ["created", "regenerated", "destroyed"]
    named = {line.split()[1] for line in lines}
    assert len(named) == 2 and all(len(n) == 16 for n in named)
    for cookie in (first, second):
        assert cookie is not None and cookie.partition(".")[0] not in caplog.text


def test_a_session_first_read_after_the_response_started_holds_no_lock() -> None:
    """Plain WSGI may render the body after start_response; with locking on, such a
    read must not take the session's lock (nothing would release it)."""

    def late(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        session = environ["statescale.session"]
        if environ["PATH_INFO"] == "/set":
            session["a"] = 1
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"set"]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(session.get("a")).encode()]  # read after the response started

    store = MemoryStore(lock_wait=0.2)
    client = client_for(store, app=late, locking=True)
    cookie = cookie_value(call(client, "/set"))
    for _ in range(3):  # a lock left held would time out the next request
        assert call(client, "/read", cookie).data == b"1"


# -- what an independent review found (each test failed on the code before) -------------


def _sessioned(app: Any, store: Any = None) -> tuple[StateScaleMiddleware, Any]:
    store = store if store is not None else MemoryStore()
    return StateScaleMiddleware(app, store, secret_keys=[SECRET], cookie=COOKIE), store


def _by_hand(mw: StateScaleMiddleware, path: str = "/", cookie: str | None = None) -> Any:
    """A hand-made server: every start_response call, and the body."""
    calls: list[tuple[str, list[tuple[str, str]]]] = []
    written: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        calls.append((status, headers))
        return written.append

    environ: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "wsgi.input": None}
    if cookie is not None:
        environ["HTTP_COOKIE"] = cookie
    body = b"".join(mw(environ, start_response))
    return calls, b"".join(written) + body


def test_02_a_version_cookie_of_non_ascii_digits_is_ignored() -> None:
    client = client_for(MemoryStore())
    cookie = cookie_value(call(client, "/set?k=a&v=1"))
    # Servers decode the header as latin-1; "²".isdigit() is true and int() refuses it.
    response = client.get("/read", headers={"Cookie": f"statescale={cookie}; statescale_v=\xb2"})
    assert response.status_code == 200 and response.json == {"a": "1"}


def test_a_value_set_then_changed_in_place_is_saved_as_changed() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        session = get_session(environ)
        if environ["PATH_INFO"] == "/cart":
            session.setdefault("cart", []).append("book")
            session["prefs"] = {}
            session["prefs"]["theme"] = "dark"
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(dict(session)).encode()]

    client = client_for(MemoryStore(), app=app)
    cookie = cookie_value(call(client, "/cart"))
    assert call(client, "/read", cookie).json == {"cart": ["book"], "prefs": {"theme": "dark"}}


def test_10_stored_json_nested_too_deep_to_read_is_dropped_not_a_500() -> None:
    store = MemoryStore()
    client = client_for(store)
    cookie = cookie_value(call(client, "/set?k=a&v=1"))
    session_id = SessionSigner([SECRET]).unsign(cookie or "")
    assert session_id is not None
    created = store.load(session_id.session_id)
    assert created is not None
    store.save(session_id.session_id, Changes({"a": b"[" * 100_000}, frozenset()), created=0.0)
    response = call(client, "/read", cookie)
    assert response.status_code == 200 and response.json == {}


def test_a_change_after_the_response_started_is_refused_not_lost() -> None:
    refused: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        session = get_session(environ)
        if environ["PATH_INFO"] == "/read":
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps(dict(session)).encode()]
        session["a"] = 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            session["b"] = 2  # saved already: this would be lost
        except SessionError as exc:
            refused.append(str(exc))
        return [b"ok"]

    client = client_for(MemoryStore(), app=app)
    cookie = cookie_value(call(client, "/"))
    assert refused and "refused" in refused[0]
    assert call(client, "/read", cookie).json == {"a": 1}


def test_19_no_body_of_the_app_follows_a_503() -> None:
    store = MemoryStore()

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("test", "down")

    store.create = failing  # type: ignore[method-assign]

    def writer(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        get_session(environ)["a"] = 1
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"SECRET-BY-WRITE")
        return [b"SECRET-IN-BODY"]

    def late(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        get_session(environ)["a"] = 1
        yield b""  # allowed before start_response
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"SECRET-LATE"

    for app in (writer, late):
        mw, _ = _sessioned(app, store)
        calls, body = _by_hand(mw)
        assert calls[-1][0].startswith("503") and body == UNAVAILABLE_BODY, (app, body)


def test_08_a_restarted_response_keeps_the_new_sessions_cookie() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        session = get_session(environ)
        session.regenerate()
        session["user"] = "ada"
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise RuntimeError("after the start, before any body")
        except RuntimeError:
            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b"error"]

    mw, store = _sessioned(app)
    calls, _ = _by_hand(mw)
    status, headers = calls[-1]
    assert status.startswith("500") and len(store) == 1
    assert any(k == "Set-Cookie" and v.startswith("statescale=") for k, v in headers)


def test_11_the_size_limit_counts_a_keys_bytes() -> None:
    session = Session(None, lambda _: None, max_size=1000)
    with pytest.raises(SessionTooLarge):
        for n in range(100):
            session["語" * 4 + str(n)] = 1  # 12 bytes of key a value, not 4
