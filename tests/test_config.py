from __future__ import annotations

import pytest

from statescale.config import CookieOptions, Settings
from statescale.cookies import CookieWriter, read_cookie
from statescale.exceptions import ConfigError


def test_cookie_defaults_are_the_safe_ones() -> None:
    header = CookieWriter(CookieOptions()).set("abc.def")
    assert header.startswith("statescale=abc.def;")
    for attribute in ("HttpOnly", "Secure", "Path=/", "SameSite=Lax"):
        assert attribute in header
    assert "Max-Age" not in header


def test_clearing_cookie_expires_it() -> None:
    header = CookieWriter(CookieOptions()).clear
    assert "Max-Age=0" in header and "statescale=;" in header.replace('""', "")


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"name": "__Host-s", "domain": "example.com"}, id="host-prefix-with-domain"),
        pytest.param({"name": "__Host-s", "path": "/app"}, id="host-prefix-with-path"),
        pytest.param({"name": "__Secure-s", "secure": False}, id="secure-prefix-not-secure"),
        pytest.param({"samesite": "None", "secure": False}, id="samesite-none-not-secure"),
        pytest.param({"samesite": "lax-ish"}, id="bad-samesite"),
        pytest.param({"name": "bad name"}, id="bad-name"),
        pytest.param({"max_age": 0}, id="zero-max-age"),
    ],
)
def test_cookie_options_that_cannot_work(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        CookieOptions(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param(None, None, id="none"),
        pytest.param("other=1", None, id="other-cookie"),
        pytest.param("a=1; statescale=v.s; b=2", "v.s", id="among-others"),
        pytest.param('statescale="quoted"', "quoted", id="quoted"),
    ],
)
def test_read_cookie(header: str | None, expected: str | None) -> None:
    assert read_cookie(header, "statescale") == expected


def test_settings_from_env() -> None:
    settings = Settings.from_env(
        {
            "STATESCALE_STORE": "memory",
            "STATESCALE_SECRET_KEYS": "k1-0123456789abcdef, k2-0123456789abcdef",
            "STATESCALE_LOCKING": "yes",
            "STATESCALE_COOKIE_SECURE": "0",
            "STATESCALE_ABSOLUTE_LIFETIME": "none",
        }
    )
    assert settings.store == "memory"
    assert settings.session.secret_keys == ("k1-0123456789abcdef", "k2-0123456789abcdef")
    assert settings.session.locking and not settings.session.cookie.secure
    assert settings.absolute_lifetime is None and not settings.development_secret
    assert Settings.from_env({}).development_secret


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"STATESCALE_STORE": "mongo"}, id="store"),
        pytest.param({"STATESCALE_MODE": "round-robin"}, id="mode"),
        pytest.param({"STATESCALE_LOCKING": "maybe"}, id="bool"),
        pytest.param({"STATESCALE_IDLE_TIMEOUT": "soon"}, id="number"),
    ],
)
def test_bad_env_says_which_variable(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=next(iter(env))):
        Settings.from_env(env)
