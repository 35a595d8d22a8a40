"""Options, as frozen dataclasses checked when they are made. Every default is defined
here, once.

:meth:`Settings.from_env` is the only place statescale reads environment variables (the
CLI and the gunicorn hooks use it); :meth:`Settings.from_mapping` reads the same names
from any mapping whose values are strings or already typed (the Flask extension passes
``app.config``); a library user passes options. :mod:`statescale.assemble` turns
:class:`Settings` into a store, an ID factory and a middleware.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .exceptions import ConfigError
from .routing import balancers
from .routing.backends import MAX_WEIGHT, Backend, check
from .signing import DEFAULT_COOKIE_NAME

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 token: a cookie name
#: A Domain or Path attribute value: printable ASCII but ';' (RFC 6265 5.2).
_ATTRIBUTE = re.compile(r"[!-:<-~]*\Z")
_SAMESITE = ("Strict", "Lax", "None")

#: Used when STATESCALE_SECRET_KEYS is not set. Public, so only for development.
DEVELOPMENT_SECRET = "statescale-development-key-NOT-SECRET"  # noqa: S105 - public on purpose

DEFAULT_IDLE_TIMEOUT = 1800.0  # seconds a session may go unused
DEFAULT_ABSOLUTE_LIFETIME = 7 * 86400.0  # seconds a session may live, however busy
DEFAULT_FIRST_LIFETIME = 120.0  # seconds a new session lives until its client comes back
DEFAULT_MEMORY_SESSIONS = 10_000  # sessions a memory store keeps per process
DEFAULT_MAX_SIZE = 64 * 1024  # bytes a session may take, encoded
DEFAULT_REDIS_TIMEOUT = 0.4  # seconds per Redis attempt (redis-py retries once)
DEFAULT_LOCAL_CACHE = 10_000  # session copies per process
#: Seconds a registered instance serves on after leaving the registry: past the hold of
#: a membership that lost more than half its members (routing.membership.follow.HOLD).
DEFAULT_DRAIN = 4.0

#: Each mode and the store it uses unless told otherwise. Sticky and affinity route each
#: session to its owner (a ring); affinity keeps the sessions in Redis behind that.
MODES = {"shared": "redis", "sticky": "memory", "affinity": "redis"}
ROUTED = ("sticky", "affinity")
STORES = ("redis", "memory")
#: Who sends each request to its session's worker under one gunicorn master (sticky
#: and affinity modes): a router process in the master, or the sync workers themselves.
ROUTINGS = ("router", "workers")


@dataclass(frozen=True)
class CookieOptions:
    """The session cookie. Defaults are the safe ones (RFC 6265bis): ``HttpOnly``,
    ``SameSite=Lax``, ``Path=/`` and ``Secure``; turn ``secure`` off only for
    plain-HTTP development. ``max_age=None`` makes a browser-session cookie; the
    server-side timeouts decide how long the session itself lives."""

    name: str = DEFAULT_COOKIE_NAME
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
        for what, value in (("domain", self.domain), ("path", self.path)):
            if value is not None and not _ATTRIBUTE.match(value):
                # ';' would add attributes, CR or LF a header: neither is a domain or path
                raise ConfigError(
                    f"cookie {what} {value!r} holds characters a cookie {what} cannot have"
                )


@dataclass(frozen=True)
class SessionOptions:
    """How sessions behave in the middleware."""

    secret_keys: tuple[str | bytes, ...]
    cookie: CookieOptions = field(default_factory=CookieOptions)
    max_size: int = DEFAULT_MAX_SIZE
    locking: bool = False

    def __post_init__(self) -> None:
        if self.max_size < 64:
            raise ConfigError(f"max_size must be at least 64 bytes, not {self.max_size!r}")


@dataclass(frozen=True)
class Settings:
    """Everything a deployment configures: the store, the mode and the sessions.

    ``store`` ``None`` means the mode's own (:data:`MODES`): see :attr:`store_kind`.
    ``embedded_redis`` asks for a private ``redis-server`` when no ``redis_url`` is set:
    for development and the demo only. Without either, building a Redis store is a
    :class:`ConfigError`.
    """

    store: str | None = None
    redis_url: str | None = None
    embedded_redis: bool = False
    mode: str = "shared"
    session: SessionOptions = field(
        default_factory=lambda: SessionOptions(secret_keys=(DEVELOPMENT_SECRET,))
    )
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    absolute_lifetime: float | None = DEFAULT_ABSOLUTE_LIFETIME
    first_lifetime: float = DEFAULT_FIRST_LIFETIME
    memory_sessions: int = DEFAULT_MEMORY_SESSIONS
    redis_timeout: float = DEFAULT_REDIS_TIMEOUT
    local_cache: int = DEFAULT_LOCAL_CACHE
    node: str | None = None  # sticky routing: this instance's name on the ring
    backends: tuple[Backend, ...] = ()  # sticky routing: every instance, in order
    balancer: str = "statescale"  # whose ring routes sessions (routing.balancers)
    #: A membership registry (routing.membership): this instance registers in it as
    #: ``node`` at ``advertise`` (default: gunicorn's bind) with ``weight``, and its
    #: ring follows it. On a graceful stop it leaves, then serves ``drain`` seconds more
    #: while the routers follow, then hands its sessions on.
    registry: str | None = None
    advertise: str | None = None
    weight: int = 1
    drain: float = DEFAULT_DRAIN
    #: Sticky and affinity under one gunicorn master: ``router`` (a router process in
    #: the master) or ``workers`` (sync workers route among themselves; see
    #: :class:`statescale.routing.router.passing.RoutingListener`).
    routing: str = "router"
    development_secret: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"STATESCALE_MODE={self.mode!r}: use one of {', '.join(MODES)}")
        if self.routing not in ROUTINGS:
            raise ConfigError(
                f"STATESCALE_ROUTING={self.routing!r}: use one of {', '.join(ROUTINGS)}"
            )
        if self.store is not None and self.store not in STORES:
            raise ConfigError(f"STATESCALE_STORE={self.store!r}: use one of {', '.join(STORES)}")
        if self.mode == "affinity" and self.store_kind != "redis":
            raise ConfigError(
                "STATESCALE_MODE=affinity keeps sessions in Redis behind sticky routing; "
                "for sessions in memory use STATESCALE_MODE=sticky"
            )
        if self.balancer not in balancers.names():
            raise ConfigError(
                f"STATESCALE_BALANCER={self.balancer!r}: use one of {', '.join(balancers.names())}"
            )
        if self.backends:
            check(self.backends)
            # A list given is served whole, or refused saying why (a registry's followers
            # leave out what the balancer cannot serve together, and go on).
            chosen = balancers.get(self.balancer)
            chosen.make_ring({chosen.node_key(b): b.weight for b in self.backends})
        self._check_registry()
        if (
            self.registry is None
            and self.node is not None
            and self.node not in {b.name for b in self.backends}
        ):
            raise ConfigError(
                f"STATESCALE_NODE={self.node!r}: list every node, this one included, in "
                "STATESCALE_BACKENDS (NAME=HOST:PORT,...)"
            )
        if self.redis_timeout <= 0:
            raise ConfigError(f"STATESCALE_REDIS_TIMEOUT={self.redis_timeout!r}: must be > 0")
        if self.memory_sessions < 1:
            raise ConfigError(f"STATESCALE_MEMORY_SESSIONS={self.memory_sessions!r}: must be >= 1")
        if self.local_cache < 0:
            raise ConfigError(f"STATESCALE_LOCAL_CACHE={self.local_cache!r}: must be >= 0")

    def _check_registry(self) -> None:
        if not 1 <= self.weight <= MAX_WEIGHT:
            raise ConfigError(
                f"STATESCALE_WEIGHT={self.weight!r}: must be a whole number from 1 to {MAX_WEIGHT}"
            )
        if self.drain < 0:
            raise ConfigError(f"STATESCALE_DRAIN={self.drain!r}: must be >= 0")
        if self.advertise is not None:
            Backend.parse(f"x={self.advertise}")  # HOST:PORT, or a ConfigError saying so
        if self.registry is not None and self.node is None:
            raise ConfigError(
                "STATESCALE_REGISTRY needs STATESCALE_NODE: the name this instance "
                "registers under (unique in the fleet)"
            )

    @property
    def store_kind(self) -> str:
        """The store in use: ``store``, or the mode's own."""
        return self.store or MODES[self.mode]

    @property
    def routed(self) -> bool:
        """Whether a ring routes each session to its owner (sticky, affinity)."""
        return self.mode in ROUTED

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read ``STATESCALE_*`` variables (see the README's configuration table)."""
        return cls.from_mapping(os.environ if env is None else env)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Settings:
        """Read the ``STATESCALE_*`` names from ``values``: strings as in the
        environment, or typed values (booleans, numbers, lists of keys or backends)."""
        parts: dict[str, dict[str, Any]] = {"": {}, "session": {}, "cookie": {}}
        for variable, (where, parse) in _VARIABLES.items():
            value = values.get(variable)
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            part, _, name = where.rpartition(".")
            parts[part][name] = parse(variable, value)
        keys = parts["session"].pop("secret_keys", ())
        given = values.get("STATESCALE_SECRET_KEYS")
        if not keys and given is not None and (not isinstance(given, str) or given.strip()):
            # Set, yet no key in it (",", " , ", an empty list): a template that
            # rendered empty must not fall back to the public development key.
            raise ConfigError(
                "STATESCALE_SECRET_KEYS is set but holds no key: give one or more, "
                "comma-separated, or leave it unset for the development key"
            )
        session = SessionOptions(
            secret_keys=keys or (DEVELOPMENT_SECRET,),
            cookie=CookieOptions(**parts["cookie"]),
            **parts["session"],
        )
        return cls(session=session, development_secret=not keys, **parts[""])


def admin_token(env: Mapping[str, str] | None = None) -> str | None:
    """``STATESCALE_ADMIN_TOKEN``: what ``statescale router``'s admin endpoint requires."""
    token = (os.environ if env is None else env).get("STATESCALE_ADMIN_TOKEN", "").strip()
    return token or None


# -- reading one variable: a string from the environment, or an already typed value --
def parse_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r}: use 1/0, true/false, yes/no or on/off")


def _word(name: str, value: object) -> str:
    return str(value).strip().lower()


def _text(name: str, value: object) -> str:
    return str(value).strip()


def _samesite(name: str, value: object) -> str:
    return str(value).strip().capitalize()  # lax -> Lax; CookieOptions checks the rest


def _number(name: str, value: object) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        number = float(value) if isinstance(value, (int, float)) else float(str(value))
    except ValueError:
        raise ConfigError(f"{name}={value!r}: expected a number") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name}={value!r}: expected a finite number")
    return number


def _optional_number(name: str, value: object) -> float | None:
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    return _number(name, value)


def _count(name: str, value: object) -> int:
    number = _number(name, value)
    if number != int(number):
        raise ConfigError(f"{name}={value!r}: expected a whole number")
    return int(number)


def _items(value: object) -> list[object]:
    if isinstance(value, str):
        return [part for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _keys(name: str, value: object) -> tuple[str | bytes, ...]:
    """Text keys, stripped; bytes keys (Flask's ``SECRET_KEY`` may be) as they are."""
    return tuple(k if isinstance(k, bytes) else str(k).strip() for k in _items(value))


def _backends(name: str, value: object) -> tuple[Backend, ...]:
    found = [
        item if isinstance(item, Backend) else Backend.parse(str(item)) for item in _items(value)
    ]
    return tuple(check(found))


#: Each variable: where it goes (a Settings field, or ``session.``/``cookie.`` one) and
#: how its value is read. The README's configuration table lists exactly these.
_VARIABLES: dict[str, tuple[str, Callable[[str, object], Any]]] = {
    "STATESCALE_STORE": ("store", _word),
    "STATESCALE_REDIS_URL": ("redis_url", _text),
    "STATESCALE_EMBEDDED_REDIS": ("embedded_redis", parse_bool),
    "STATESCALE_MODE": ("mode", _word),
    "STATESCALE_SECRET_KEYS": ("session.secret_keys", _keys),
    "STATESCALE_LOCKING": ("session.locking", parse_bool),
    "STATESCALE_MAX_SIZE": ("session.max_size", _count),
    "STATESCALE_COOKIE_NAME": ("cookie.name", _text),
    "STATESCALE_COOKIE_SECURE": ("cookie.secure", parse_bool),
    "STATESCALE_COOKIE_DOMAIN": ("cookie.domain", _text),
    "STATESCALE_COOKIE_PATH": ("cookie.path", _text),
    "STATESCALE_COOKIE_HTTPONLY": ("cookie.httponly", parse_bool),
    "STATESCALE_COOKIE_SAMESITE": ("cookie.samesite", _samesite),
    "STATESCALE_COOKIE_MAX_AGE": ("cookie.max_age", _count),
    "STATESCALE_IDLE_TIMEOUT": ("idle_timeout", _number),
    "STATESCALE_ABSOLUTE_LIFETIME": ("absolute_lifetime", _optional_number),
    "STATESCALE_FIRST_LIFETIME": ("first_lifetime", _number),
    "STATESCALE_MEMORY_SESSIONS": ("memory_sessions", _count),
    "STATESCALE_REDIS_TIMEOUT": ("redis_timeout", _number),
    "STATESCALE_LOCAL_CACHE": ("local_cache", _count),
    "STATESCALE_NODE": ("node", _text),
    "STATESCALE_BACKENDS": ("backends", _backends),
    "STATESCALE_BALANCER": ("balancer", _word),
    "STATESCALE_REGISTRY": ("registry", _text),
    "STATESCALE_ADVERTISE": ("advertise", _text),
    "STATESCALE_WEIGHT": ("weight", _count),
    "STATESCALE_DRAIN": ("drain", _number),
    "STATESCALE_ROUTING": ("routing", _word),
}
