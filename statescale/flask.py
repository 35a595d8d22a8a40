"""Flask integration: ``flask.session`` becomes a statescale session.

::

    app = Flask(__name__)
    app.config["STATESCALE_REDIS_URL"] = "redis://localhost:6379/0"
    app.config["STATESCALE_SECRET_KEYS"] = ["old-key-...", "new-key-..."]
    StateScale(app)

Every ``STATESCALE_*`` environment variable of the README's table works as an
``app.config`` key too, as a string or typed (a list of keys, a boolean, a number).
Without ``STATESCALE_SECRET_KEYS`` the app's ``SECRET_KEY`` (and Flask's
``SECRET_KEY_FALLBACKS``, oldest first) sign the cookies.

A store outage becomes a 503 with ``Retry-After`` through a Flask error handler.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flask import Flask, Request, Response
from flask import request as flask_request
from flask.sessions import SessionInterface

from .assemble import build_middleware, hosted
from .config import Settings
from .exceptions import ConfigError, SessionError, StoreError
from .middleware import (
    ENVIRON_KEY,
    OUTSIDE_KEY,
    UNAVAILABLE_BODY,
    StateScaleMiddleware,
    unavailable_response,
)
from .session import Session
from .stores import Store

log = logging.getLogger("statescale")

_PREFIX = "STATESCALE_"
#: Flask's cookie settings, carried over when the app set them (not at Flask's default)
#: and the ``STATESCALE_*`` one is unset. statescale's own defaults are the safe ones:
#: ``Secure``, ``HttpOnly``, ``SameSite=Lax``.
_FLASK_COOKIE = {
    "SESSION_COOKIE_NAME": "STATESCALE_COOKIE_NAME",
    "SESSION_COOKIE_DOMAIN": "STATESCALE_COOKIE_DOMAIN",
    "SESSION_COOKIE_PATH": "STATESCALE_COOKIE_PATH",
    "SESSION_COOKIE_SECURE": "STATESCALE_COOKIE_SECURE",
    "SESSION_COOKIE_HTTPONLY": "STATESCALE_COOKIE_HTTPONLY",
    "SESSION_COOKIE_SAMESITE": "STATESCALE_COOKIE_SAMESITE",
}


def settings_from_config(config: dict[str, Any]) -> Settings:
    """:class:`Settings` from a Flask config: the ``STATESCALE_*`` names, typed or not;
    without ``STATESCALE_SECRET_KEYS``, Flask's own signing keys, oldest first; and
    Flask's ``SESSION_COOKIE_*`` settings the app set, where no ``STATESCALE_*`` one is."""
    values = {name: value for name, value in config.items() if name.startswith(_PREFIX)}
    for flask_name, name in _FLASK_COOKIE.items():
        value = config.get(flask_name)
        if name not in values and value not in (None, Flask.default_config.get(flask_name)):
            values[name] = value
    given = values.get("STATESCALE_SECRET_KEYS")
    unset = not given or (isinstance(given, str) and not given.strip())  # as from_mapping
    if unset and config.get("SECRET_KEY"):
        # (Flask 3.1's default SECRET_KEY_FALLBACKS is None; keys may be bytes)
        keys = [*(config.get("SECRET_KEY_FALLBACKS") or []), config["SECRET_KEY"]]
        values["STATESCALE_SECRET_KEYS"] = keys
    return Settings.from_mapping(values)


class StateScaleSessionInterface(SessionInterface):
    """Hands Flask the session the middleware opened; the middleware saves it when
    the response starts. What cannot be stored fails in :meth:`save_session`, inside
    Flask's error handling (its log, ``got_request_exception``, the 500 handler),
    and nothing of that request is saved."""

    def __init__(self, middleware: StateScaleMiddleware) -> None:
        self.middleware = middleware

    def open_session(self, app: Flask, request: Request) -> Session:  # type: ignore[override]
        session: Session | None = request.environ.get(ENVIRON_KEY)
        if session is None:  # not through the middleware: a test or shell context
            session = self.middleware.open_outside(request.environ)
        return session

    def save_session(self, app: Flask, session: Any, response: Response) -> None:
        if not isinstance(session, Session):
            return
        if flask_request and flask_request.environ.get(OUTSIDE_KEY):
            response.headers.extend(self.middleware.save_outside(session))
            return
        try:
            session.changes()  # the middleware saves them; here, what cannot be stored fails
        except SessionError:
            session.abandon()  # the response is Flask's error: nothing of it is saved
            raise

    def is_null_session(self, obj: object) -> bool:
        return not isinstance(obj, Session)


@dataclass(frozen=True)
class AppState:
    """What one app runs with: ``app.extensions["statescale"]``."""

    middleware: StateScaleMiddleware
    #: What this process runs with, the hosting server's decisions included.
    settings: Settings


class StateScale:
    """The Flask extension: ``StateScale(app)``, or ``ext = StateScale()`` and later
    ``ext.init_app(app)``. ``store`` overrides the one the config describes.
    ``middleware`` and ``settings`` are those of the app set up last; with several
    apps, each one's are in ``app.extensions["statescale"]`` (:class:`AppState`)."""

    def __init__(self, app: Flask | None = None, store: Store | None = None) -> None:
        self.store = store
        self.middleware: StateScaleMiddleware | None = None
        self.settings: Settings | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        if "statescale" in app.extensions:
            raise ConfigError("StateScale is already set up on this app")
        settings = settings_from_config(app.config)
        middleware = build_middleware(app.wsgi_app, settings, store=self.store)
        state = AppState(middleware, hosted(settings))
        self.middleware, self.settings = state.middleware, state.settings
        lifetime = "PERMANENT_SESSION_LIFETIME"
        if app.config.get(lifetime) != Flask.default_config.get(lifetime):
            log.warning(
                "statescale: %s is not used; a session lives STATESCALE_IDLE_TIMEOUT "
                "idle, and STATESCALE_ABSOLUTE_LIFETIME at most",
                lifetime,
            )
        app.wsgi_app = middleware  # type: ignore[method-assign]
        app.session_interface = StateScaleSessionInterface(middleware)
        app.extensions["statescale"] = state

        def unavailable(exc: StoreError) -> Response:
            middleware.log_outage(exc)
            status, headers = unavailable_response(exc)
            return Response(UNAVAILABLE_BODY, status, headers)

        app.register_error_handler(StoreError, unavailable)
