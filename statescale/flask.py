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

from typing import Any

from flask import Flask, Request, Response
from flask.sessions import SessionInterface

from .assemble import build_middleware, hosted
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
    """:class:`Settings` from a Flask config: the ``STATESCALE_*`` names, typed or not;
    without ``STATESCALE_SECRET_KEYS``, Flask's own signing keys, oldest first."""
    values = {name: value for name, value in config.items() if name.startswith(_PREFIX)}
    if not values.get("STATESCALE_SECRET_KEYS") and config.get("SECRET_KEY"):
        keys = [*config.get("SECRET_KEY_FALLBACKS", []), config["SECRET_KEY"]]
        values["STATESCALE_SECRET_KEYS"] = [str(key) for key in keys]
    return Settings.from_mapping(values)


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
        middleware = build_middleware(app.wsgi_app, settings, store=self.store)
        self.middleware = middleware
        #: What this process runs with, the hosting server's decisions included.
        self.settings = hosted(settings)
        app.wsgi_app = middleware  # type: ignore[method-assign]
        app.session_interface = StateScaleSessionInterface()
        app.extensions["statescale"] = self

        def unavailable(exc: StoreError) -> Response:
            middleware.log_outage(exc)
            status, headers = unavailable_response(exc)
            return Response(UNAVAILABLE_BODY, status, headers)

        app.register_error_handler(StoreError, unavailable)
