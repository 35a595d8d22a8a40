"""The Cookie header, fuzzed with Hypothesis (RELIABILITY 2): arbitrary bytes and
Unicode, several cookies, duplicates of ours, other applications' cookies. Never a 500,
and a valid session cookie is never lost because of anything else the header carries."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import create_environ

from benchmarks.rig.harness import Gunicorn, SessionClient
from statescale import CookieOptions, StateScaleMiddleware, get_session
from statescale.signing import SessionSigner
from statescale.stores import MemoryStore
from tests.conftest import SECRET


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    session = get_session(environ)
    if environ["PATH_INFO"] == "/set":
        session["a"] = "1"
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(dict(session)).encode()]


STORE = MemoryStore(idle_timeout=86400, first_lifetime=86400)  # made at import, used later
MIDDLEWARE = StateScaleMiddleware(
    app, STORE, secret_keys=[SECRET], cookie=CookieOptions(secure=False)
)


def run(path: str, cookie_header: str | None) -> tuple[str, bytes]:
    environ = create_environ(path)
    if cookie_header is not None:
        environ["HTTP_COOKIE"] = cookie_header  # as a WSGI server hands it over
    seen: list[str] = []
    body = b"".join(MIDDLEWARE(environ, lambda status, headers, exc=None: seen.append(status)))
    return seen[0], body


def latin1(data: bytes) -> str:
    """Header bytes as WSGI presents them (PEP 3333: latin-1 decoded)."""
    return data.decode("latin-1")


VALID = SessionSigner([SECRET]).sign  # bound below to a stored session
_, _ = run("/set", None)
SESSION_ID = next(iter(STORE._probation))  # the one session /set made
COOKIE = VALID(SESSION_ID)

names = st.sampled_from(["statescale", "statescale_v", "Statescale", " statescale", "other"])
junk = st.one_of(
    st.binary(max_size=80).map(latin1),
    st.text(max_size=40).map(lambda t: latin1(t.encode("utf-8"))),
)
pairs = st.one_of(
    junk,
    st.tuples(names, junk).map(lambda p: f"{p[0]}={p[1]}"),
    st.tuples(st.text(alphabet="abcdefgh_-", min_size=1, max_size=8), junk).map(
        lambda p: f"{p[0]}={p[1]}"
    ),
    st.just('a="unterminated'),
    st.just("statescale=" + COOKIE[:-3] + "AAA"),  # a near miss: bad signature
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_any_bytes_are_never_a_500(raw: bytes) -> None:
    for path in ("/read", "/set"):
        status, body = run(path, latin1(raw))
        assert status == "200 OK"
        assert json.loads(body).get("a") in (None, "1")


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(pairs, max_size=8), st.integers(min_value=0), st.sampled_from([";", "; ", " ;"]))
def test_a_valid_session_cookie_survives_anything_beside_it(
    others: list[str], where: int, separator: str
) -> None:
    parts = list(others)
    parts.insert(where % (len(parts) + 1), f"statescale={COOKIE}")
    status, body = run("/read", separator.join(parts))
    assert status == "200 OK"
    assert json.loads(body) == {"a": "1"}


@pytest.mark.integration
def test_nasty_headers_through_real_gunicorn(redis_url: str) -> None:
    with Gunicorn(env={"STATESCALE_REDIS_URL": redis_url}, workers=2) as server:
        client = SessionClient(server.port)
        client.post("/api/set?key=a&value=1")
        cookie = client.cookie
        assert cookie is not None
        headers = [
            f'statescale=forged.sig; a="open; statescale={cookie}; statescale_v=x',
            f"statescale={cookie}; statescale={cookie[:-2]}xx; statescale_v=99999999999",
            # (control characters gunicorn itself refuses with 400, before any app)
            f"\xff\xfe=\xc3\x28; statescale={cookie};;; =; ==; statescale",
            f"{'x' * 3000}=1; statescale={cookie}",
        ]
        seen = []
        for header in headers:
            other = SessionClient(server.port)
            other.cookies = {}
            reply = other.request("GET", "/api/session", cookie_header=header)
            seen.append((reply.status, reply.json["data"] if reply.status == 200 else None))
    assert seen == [(200, {"a": "1"})] * len(headers)


def test_a_comma_in_another_cookie_never_makes_a_pair_of_ours() -> None:
    # An independent review: with the header split on commas too, a raw comma in
    # another cookie's value (a script's "prefs" cookie) chose the session.
    forged = VALID("an-id-this-store-never-made")
    status, body = run("/read", f"prefs=x,statescale={forged},y; statescale={COOKIE}")
    assert status == "200 OK" and json.loads(body) == {"a": "1"}


def test_cookie_lines_joined_by_the_server_end_a_value_of_ours_at_the_comma() -> None:
    status, body = run("/read", f"statescale={COOKIE}, x=1; statescale=other.sig")
    assert status == "200 OK" and json.loads(body) == {"a": "1"}
