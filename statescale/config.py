"""Options, as frozen dataclasses checked when they are made.

:meth:`Settings.from_env` is the only place statescale reads environment variables (the
demo app, the CLI and the gunicorn hooks use it; a library user passes options).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .exceptions import ConfigError
from .routing import balancers

log = logging.getLogger("statescale")

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 token: a cookie name
_SAMESITE = ("Strict", "Lax", "None")

#: Used when STATESCALE_SECRET_KEYS is not set. Public, so only for development.
DEVELOPMENT_SECRET = "statescale-development-key-NOT-SECRET"  # noqa: S105 - public on purpose


@dataclass(frozen=True)
class CookieOptions:
    """The session cookie. Defaults are the safe ones (RFC 6265bis): ``HttpOnly``,
    ``SameSite=Lax``, ``Path=/`` and ``Secure``; turn ``secure`` off only for
    plain-HTTP development. ``max_age=None`` makes a browser-session cookie; the
    server-side timeouts decide how long the session itself lives."""

    name: str = "statescale"
    path: str = "/"
    domain: str | None = None
    secure: bool = True
    httponly: bool = True
    samesite: str | None = "Lax"
    max_age: int | None = None

    def __post_init__(self) -> None:
        if not _TOKEN.match(self.name):
            raise ConfigError(f"cookie name {self.name!r} has characters a cookie name cannot have")
        if self.samesite is not None and self.samesite not in _SAMESITE:
            raise ConfigError(f"samesite must be one of {_SAMESITE} or None, not {self.samesite!r}")
        if self.samesite == "None" and not self.secure:
            raise ConfigError("SameSite=None cookies must be Secure; set secure=True")
        if self.name.startswith(("__Secure-", "__Host-")) and not self.secure:
            raise ConfigError(f"a cookie named {self.name!r} must be Secure; set secure=True")
        if self.name.startswith("__Host-") and (self.domain is not None or self.path != "/"):
            raise ConfigError(
                f"a cookie named {self.name!r} must have no Domain and Path=/ "
                "(RFC 6265bis 4.1.3.2); drop domain or rename the cookie"
            )
        if self.max_age is not None and self.max_age <= 0:
            raise ConfigError(f"max_age must be > 0 or None, not {self.max_age!r}")


@dataclass(frozen=True)
class SessionOptions:
    """How sessions behave in the middleware."""

    secret_keys: tuple[str, ...]
    cookie: CookieOptions = field(default_factory=CookieOptions)
    max_size: int = 64 * 1024
    locking: bool = False

    def __post_init__(self) -> None:
        if self.max_size < 64:
            raise ConfigError(f"max_size must be at least 64 bytes, not {self.max_size!r}")


def parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}={value!r}: use 1/0, true/false, yes/no or on/off")


def _number(env: Mapping[str, str], name: str, default: float | None) -> float | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return default
    if value.strip().lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r}: expected a number of seconds") from None


@dataclass(frozen=True)
class Settings:
    """Everything the demo app, the CLI and the gunicorn hooks configure."""

    store: str = "redis"
    redis_url: str | None = None
    mode: str = "shared"
    session: SessionOptions = field(
        default_factory=lambda: SessionOptions(secret_keys=(DEVELOPMENT_SECRET,))
    )
    idle_timeout: float = 1800.0
    absolute_lifetime: float | None = 7 * 86400.0
    redis_timeout: float = 0.4
    local_cache: int = 10_000
    node: str | None = None  # sticky mode: this instance's name on the ring
    backends: tuple[str, ...] = ()  # sticky mode: every instance, NAME=HOST:PORT
    balancer: str = "statescale"  # whose ring routes: statescale, nginx or haproxy
    development_secret: bool = False

    def __post_init__(self) -> None:
        if self.store not in ("redis", "memory"):
            raise ConfigError(f"STATESCALE_STORE={self.store!r}: use 'redis' or 'memory'")
        if self.mode not in ("shared", "sticky"):
            raise ConfigError(f"STATESCALE_MODE={self.mode!r}: use 'shared' or 'sticky'")
        if self.balancer not in balancers.names():
            raise ConfigError(
                f"STATESCALE_BALANCER={self.balancer!r}: use one of {', '.join(balancers.names())}"
            )
        if self.node is not None and not self.backends:
            raise ConfigError("STATESCALE_NODE is set: list every node in STATESCALE_BACKENDS")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read ``STATESCALE_*`` variables (see the README's configuration table)."""
        env = os.environ if env is None else env
        raw_keys = env.get("STATESCALE_SECRET_KEYS", "")
        keys = tuple(k.strip() for k in raw_keys.split(",") if k.strip())
        cookie = CookieOptions(
            name=env.get("STATESCALE_COOKIE_NAME", "statescale"),
            secure=parse_bool("STATESCALE_COOKIE_SECURE", env.get("STATESCALE_COOKIE_SECURE", "1")),
            domain=env.get("STATESCALE_COOKIE_DOMAIN") or None,
        )
        options = SessionOptions(
            secret_keys=keys or (DEVELOPMENT_SECRET,),
            cookie=cookie,
            max_size=int(_number(env, "STATESCALE_MAX_SIZE", 64 * 1024) or 0),
            locking=parse_bool("STATESCALE_LOCKING", env.get("STATESCALE_LOCKING", "0")),
        )
        idle = _number(env, "STATESCALE_IDLE_TIMEOUT", 1800.0)
        return cls(
            store=env.get("STATESCALE_STORE", "redis").strip().lower(),
            redis_url=env.get("STATESCALE_REDIS_URL") or None,
            mode=env.get("STATESCALE_MODE", "shared").strip().lower(),
            session=options,
            idle_timeout=1800.0 if idle is None else idle,
            absolute_lifetime=_number(env, "STATESCALE_ABSOLUTE_LIFETIME", 7 * 86400.0),
            redis_timeout=_number(env, "STATESCALE_REDIS_TIMEOUT", 0.4) or 0.4,
            local_cache=int(_number(env, "STATESCALE_LOCAL_CACHE", 10_000) or 0),
            node=env.get("STATESCALE_NODE") or None,
            backends=tuple(
                b.strip() for b in env.get("STATESCALE_BACKENDS", "").split(",") if b.strip()
            ),
            balancer=env.get("STATESCALE_BALANCER", "statescale").strip().lower(),
            development_secret=not keys,
        )
