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
        pytest.param({"STATESCALE_ROUTING": "nginx"}, id="routing"),
        pytest.param({"STATESCALE_LOCKING": "maybe"}, id="bool"),
        pytest.param({"STATESCALE_IDLE_TIMEOUT": "soon"}, id="number"),
    ],
)
def test_bad_env_says_which_variable(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=next(iter(env))):
        Settings.from_env(env)


def test_typed_values_read_as_their_strings_do() -> None:
    typed = Settings.from_mapping(
        {
            "STATESCALE_SECRET_KEYS": ["k1-0123456789abcdef", "k2-0123456789abcdef"],
            "STATESCALE_LOCKING": True,
            "STATESCALE_COOKIE_SECURE": False,
            "STATESCALE_IDLE_TIMEOUT": 60,
            "STATESCALE_LOCAL_CACHE": 0,
            "STATESCALE_BACKENDS": ["a=127.0.0.1:1", "b=127.0.0.1:2*2"],
            "STATESCALE_NODE": "a",
        }
    )
    strings = Settings.from_env(
        {
            "STATESCALE_SECRET_KEYS": "k1-0123456789abcdef,k2-0123456789abcdef",
            "STATESCALE_LOCKING": "1",
            "STATESCALE_COOKIE_SECURE": "0",
            "STATESCALE_IDLE_TIMEOUT": "60",
            "STATESCALE_LOCAL_CACHE": "0",
            "STATESCALE_BACKENDS": "a=127.0.0.1:1, b=127.0.0.1:2*2",
            "STATESCALE_NODE": "a",
        }
    )
    assert typed == strings
    assert typed.backends[1].weight == 2 and typed.local_cache == 0


def test_defaults_are_defined_once() -> None:
    from statescale import config
    from statescale.middleware import StateScaleMiddleware
    from statescale.stores.memory import MemoryStore
    from statescale.stores.redis import RedisStore

    settings = Settings()
    assert settings.idle_timeout == config.DEFAULT_IDLE_TIMEOUT
    assert settings.session.max_size == config.DEFAULT_MAX_SIZE
    for function in (MemoryStore.__init__, RedisStore.__init__):
        defaults = function.__kwdefaults__
        assert defaults["idle_timeout"] == config.DEFAULT_IDLE_TIMEOUT
        assert defaults["absolute_lifetime"] == config.DEFAULT_ABSOLUTE_LIFETIME
    assert StateScaleMiddleware.__init__.__kwdefaults__["max_size"] == config.DEFAULT_MAX_SIZE
    assert Settings.from_env({}) == Settings(development_secret=True)


def test_the_store_follows_the_mode_unless_named() -> None:
    assert Settings().store_kind == "redis"
    assert Settings(mode="sticky").store_kind == "memory"
    assert Settings(mode="sticky", store="redis").store_kind == "redis"
    assert Settings(mode="affinity").store_kind == "redis"
    assert Settings(mode="affinity").routed and Settings(mode="sticky").routed
    assert not Settings().routed


def test_affinity_refuses_the_memory_store() -> None:
    with pytest.raises(ConfigError, match="STATESCALE_MODE=sticky"):
        Settings.from_env({"STATESCALE_MODE": "affinity", "STATESCALE_STORE": "memory"})


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"STATESCALE_NODE": "a"}, id="node-without-backends"),
        pytest.param(
            {"STATESCALE_NODE": "c", "STATESCALE_BACKENDS": "a=h:1,b=h:2"}, id="node-not-listed"
        ),
        pytest.param({"STATESCALE_BACKENDS": "a=h:1,a=h:2"}, id="duplicate-backends"),
        pytest.param({"STATESCALE_BALANCER": "envoy"}, id="balancer"),
        pytest.param({"STATESCALE_REDIS_TIMEOUT": "0"}, id="timeout"),
        pytest.param({"STATESCALE_LOCAL_CACHE": "1.5"}, id="whole-number"),
    ],
)
def test_settings_that_cannot_work(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env(env)


# -- what an independent review found (each test failed on the code before) -------------


@pytest.mark.parametrize("keys", [",", " , , ", []])
def test_secret_keys_set_yet_empty_are_refused_not_the_public_key(keys: object) -> None:
    with pytest.raises(ConfigError, match="holds no key"):
        Settings.from_mapping({"STATESCALE_SECRET_KEYS": keys})
    assert Settings.from_mapping({"STATESCALE_SECRET_KEYS": ""}).development_secret  # unset


@pytest.mark.parametrize(
    "domain", ["example.com; SameSite=None; Partitioned", "example.com\r\nX-Evil: 1"]
)
def test_a_cookie_domain_cannot_carry_attributes_or_headers(domain: str) -> None:
    with pytest.raises(ConfigError, match="cookie domain"):
        Settings.from_mapping({"STATESCALE_COOKIE_DOMAIN": domain})
    assert CookieOptions(domain=".example.com").domain == ".example.com"


def test_backends_given_that_haproxy_cannot_serve_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="share an HAProxy server id"):
        Settings.from_mapping(
            {"STATESCALE_BALANCER": "haproxy", "STATESCALE_BACKENDS": "node862=h:1,node1593=h:2"}
        )
