"""The statescale demo: a small Flask app whose session shows which worker served it.

Run it with ``gunicorn -w 4 demo_app:app`` from the repository root (the root's
``gunicorn.conf.py`` asks for one embedded Redis that all workers share when no
``STATESCALE_REDIS_URL`` is set). ``STATESCALE_STORE=memory`` shows what goes wrong
without a shared store. Every JSON body carries ``pid``, the process that served it.
"""

from __future__ import annotations

import hashlib
import os

from flask import Flask, Response, jsonify, request, session

from statescale import SessionError, SessionTooLarge, get_session
from statescale.assemble import ring_owner
from statescale.flask import StateScale

from .page import PAGE


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    # The demo is served over plain HTTP on loopback; a Secure cookie would not come back
    # from HTTP clients there. Production keeps the secure default.
    env.setdefault("STATESCALE_COOKIE_SECURE", "0")
    return env


def tag(session_id: str | None) -> str | None:
    """What the demo shows of a session ID: a short hash of it, which names the
    session on the page and in answers (it changes when the ID does) and gives away
    nothing of the ID itself, as a piece of it would."""
    if session_id is None:
        return None
    return hashlib.blake2b(session_id.encode(), digest_size=4).hexdigest()


def _key() -> str:
    key = request.args.get("key", "")
    if not key:
        raise _BadRequest("give the session key as ?key=NAME")
    return key


class _BadRequest(Exception):
    pass


def create_app(env: dict[str, str] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(
        {k: v for k, v in (env or _environment()).items() if k.startswith("STATESCALE_")}
    )
    StateScale(app)
    ext = app.extensions["statescale"]  # this app's middleware and settings
    store_name = ext.middleware.store.name
    mode, node = ext.settings.mode, ext.settings.node
    owner_of = ring_owner(ext.settings)

    def reply(*, owner: bool = True, **body: object) -> Response:
        """Every JSON answer says who served it: the process and its node on the ring
        (in sticky and affinity modes); with ``owner``, which session this is (``tag``)
        and which node owns it there (which loads the session: /health never asks).
        A session this request creates gets its ID when the response starts: the node
        mints one it owns, so the owner is this node, and the tag comes next time."""
        if not owner:
            return jsonify(pid=os.getpid(), mode=mode, node=node, owner=None, **body)
        current = get_session(request.environ)
        session_id = current.id
        created = session_id is None and current.modified and len(current) > 0
        whose = owner_of(session_id) if session_id else (node if created else None)
        return jsonify(
            pid=os.getpid(), mode=mode, node=node, owner=whose, session=tag(session_id), **body
        )

    @app.errorhandler(_BadRequest)
    def bad_request(exc: _BadRequest) -> tuple[Response, int]:
        return reply(error=str(exc), owner=False), 400

    @app.errorhandler(SessionError)
    def session_error(exc: SessionError) -> tuple[Response, int]:
        # A key or value the session cannot hold is the client's doing here: its query.
        return reply(error=str(exc), owner=False), 413 if isinstance(exc, SessionTooLarge) else 400

    @app.get("/")
    def index() -> str:
        session_id = get_session(request.environ).id
        return PAGE.render(
            data=dict(session),
            pid=os.getpid(),
            store=store_name,
            mode=mode,
            node=node,
            owner=owner_of(session_id) if session_id else None,
            session_id=tag(session_id),
        )

    @app.get("/health")
    def health() -> Response:
        return reply(ok=True, owner=False)

    @app.get("/api/session")
    def read() -> Response:
        return reply(data=dict(session), store=store_name)

    @app.post("/api/incr")
    def incr() -> Response | tuple[Response, int]:
        key = _key()
        current = session.get(key, 0)
        if not isinstance(current, int) or isinstance(current, bool):
            return reply(error=f"session[{key!r}] is not an integer"), 409
        session[key] = current + 1
        return reply(key=key, value=current + 1)

    @app.post("/api/set")
    def set_value() -> Response:
        key = _key()
        session[key] = request.args.get("value", "")
        return reply(key=key, value=session[key])

    @app.post("/api/delete")
    def delete() -> Response:
        key = _key()
        existed = session.pop(key, None) is not None
        return reply(key=key, deleted=existed)

    @app.post("/api/login")
    def login() -> Response:
        user = request.args.get("user", "")
        if not user:
            raise _BadRequest("give the user as ?user=NAME")
        get_session(request.environ).regenerate()
        session["user"] = user
        return reply(user=user)

    @app.post("/api/logout")
    def logout() -> Response:
        get_session(request.environ).invalidate()
        return reply(logged_out=True)

    return app


def __getattr__(name: str) -> Flask:
    """``demo_app:app``, built from the environment when gunicorn first asks for it."""
    if name == "app":
        globals()["app"] = built = create_app()
        return built
    raise AttributeError(name)
