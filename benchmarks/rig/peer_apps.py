"""The same routes under every session library, for side-by-side runs under gunicorn.

* ``statescale_app``: statescale's Flask extension, configured by ``STATESCALE_*``
  variables as the demo is (the demo's own answers carry more: its mode, node, owner);
* ``flask_session_app``: Flask-Session 0.8 with Redis (``STATESCALE_REDIS_URL``);
* ``signed_cookie_app``: Flask's own signed-cookie sessions (no server-side store);
* ``plain_app``: no session library at all (Flask's own sessions switched off): the
  ceiling every configuration is measured against.

Needs the ``bench`` extra (Flask-Session).
"""

from __future__ import annotations

import os

from flask import Flask, Request, jsonify, request, session
from flask.sessions import SessionInterface
from flask.wrappers import Response


def _routes(app: Flask) -> Flask:
    @app.get("/health")
    def health() -> Response:
        return jsonify(pid=os.getpid(), ok=True)

    @app.get("/api/session")
    def read() -> Response:
        return jsonify(pid=os.getpid(), data=dict(session))

    @app.post("/api/incr")
    def incr() -> Response:
        key = request.args.get("key", "n")
        session[key] = session.get(key, 0) + 1
        return jsonify(pid=os.getpid(), key=key, value=session[key])

    @app.post("/api/set")
    def set_value() -> Response:
        key = request.args.get("key", "k")
        session[key] = request.args.get("value", "")
        return jsonify(pid=os.getpid(), key=key, value=session[key])

    return app


def _flask_session() -> Flask:
    import redis
    from flask_session import Session

    app = Flask(__name__)
    app.config.update(
        SESSION_TYPE="redis",
        SESSION_REDIS=redis.Redis.from_url(os.environ["STATESCALE_REDIS_URL"]),
        SECRET_KEY=os.environ.get("STATESCALE_SECRET_KEYS", "peer-secret-0123456789"),
        SESSION_COOKIE_NAME="statescale",
    )
    Session(app)
    return _routes(app)


def _statescale() -> Flask:
    from statescale.flask import StateScale

    app = Flask(__name__)
    app.config.update({k: v for k, v in os.environ.items() if k.startswith("STATESCALE_")})
    StateScale(app)
    return _routes(app)


def _signed_cookie() -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=os.environ.get("STATESCALE_SECRET_KEYS", "peer-secret-0123456789"),
        SESSION_COOKIE_NAME="statescale",
    )
    return _routes(app)


class _NoSessions(SessionInterface):
    """Flask with no session machinery: every request gets Flask's null session."""

    def open_session(self, app: Flask, request: Request) -> None:
        return None

    def save_session(self, app: Flask, session: object, response: Response) -> None:
        return None


def _plain() -> Flask:
    app = Flask(__name__)
    app.session_interface = _NoSessions()

    @app.get("/health")
    def health() -> Response:
        return jsonify(pid=os.getpid(), ok=True)

    return app


def __getattr__(name: str) -> Flask:  # build only the app gunicorn asks for
    if name == "statescale_app":
        return _statescale()
    if name == "flask_session_app":
        return _flask_session()
    if name == "signed_cookie_app":
        return _signed_cookie()
    if name == "plain_app":
        return _plain()
    raise AttributeError(name)
