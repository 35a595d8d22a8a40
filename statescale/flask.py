"""Flask integration: ``flask.session`` becomes a statescale session.

::

    app = Flask(__name__)
    app.config["STATESCALE_REDIS_URL"] = "redis://localhost:6379/0"
    app.config["STATESCALE_SECRET_KEYS"] = ["old-key-...", "new-key-..."]
    StateScale(app)

Every ``STATESCALE_*`` environment variable of the README's table works as an
``app.config`` key too (lists or comma-separated strings for the keys, booleans for the
switches). Without ``STATESCALE_SECRET_KEYS`` the app's ``SECRET_KEY`` (and Flask's
``SECRET_KEY_FALLBACKS``, oldest first) sign the cookies.

A store outage becomes a 503 with ``Retry-After`` through a Flask error handler.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Request, Response
from flask.sessions import SessionInterface

from .config import Settings
from .exceptions import ConfigError, StoreError
from .middleware import (
    ENVIRON_KEY,
    UNAVAILABLE_BODY,
    StateScaleMiddleware,
    unavailable_response,
)
from .session import Session
from .stores import Store

_PREFIX = "STATESCALE_"


def settings_from_config(config: dict[str, Any]) -> Settings:
    """:class:`Settings` from a Flask config, reading the same names as the environment."""
    env: dict[str, str] = {}
    for name, value in config.items():
        if not name.startswith(_PREFIX) or value is None:
            continue
        if isinstance(value, bool):
            env[name] = "1" if value else "0"
        elif isinstance(value, (list, tuple)):
            env[name] = ",".join(str(v) for v in value)
        else:
            env[name] = str(value)
    if "STATESCALE_SECRET_KEYS" not in env and config.get("SECRET_KEY"):
        keys = [*config.get("SECRET_KEY_FALLBACKS", []), config["SECRET_KEY"]]
        env["STATESCALE_SECRET_KEYS"] = ",".join(str(k) for k in keys)
    return Settings.from_env(env)


class StateScaleSessionInterface(SessionInterface):
    """Hands Flask the session the middleware opened; the middleware saves it."""

    def open_session(self, app: Flask, request: Request) -> Session | None:  # type: ignore[override]
        session: Session | None = request.environ.get(ENVIRON_KEY)
        return session

    def save_session(self, app: Flask, session: Any, response: Response) -> None:
        return None  # saved by the middleware when the response starts

    def is_null_session(self, obj: object) -> bool:
        return not isinstance(obj, Session)


class StateScale:
    """The Flask extension: ``StateScale(app)``, or ``ext = StateScale()`` and later
    ``ext.init_app(app)``. ``store`` overrides the one the config describes."""

    def __init__(self, app: Flask | None = None, store: Store | None = None) -> None:
        self.store = store
        self.middleware: StateScaleMiddleware | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        if "statescale" in app.extensions:
            raise ConfigError("StateScale is already set up on this app")
        settings = settings_from_config(app.config)
        middleware = StateScaleMiddleware.from_settings(app.wsgi_app, settings, self.store)
        self.middleware = middleware
        app.wsgi_app = middleware  # type: ignore[method-assign]
        app.session_interface = StateScaleSessionInterface()
        app.extensions["statescale"] = self

        def unavailable(exc: StoreError) -> Response:
            middleware.log_outage(exc)
            status, headers = unavailable_response(exc)
            return Response(UNAVAILABLE_BODY, status, headers)

        app.register_error_handler(StoreError, unavailable)
