"""The same routes under every session library, for side-by-side runs under gunicorn.

* ``statescale_app``: statescale's Flask extension, configured by ``STATESCALE_*``
  variables as the demo is (the demo's own answers carry more: its mode, node, owner);
* ``flask_session_app``: Flask-Session 0.8 with Redis (``STATESCALE_REDIS_URL``);
* ``signed_cookie_app``: Flask's own signed-cookie sessions (no server-side store);
* ``plain_app``: no session library at all (Flask's own sessions switched off): the
  ceiling every configuration is measured against;
* ``floor1_app``, ``floor2_app`` (:mod:`benchmarks.floor`): the same routes with no
  session library, doing only the Redis round trips a session needs, over a bare
  socket: one a write, reads served from the process's memory (as affinity's owner
  does); or a read and a write, reads too from Redis (as a store that keeps no copy
  does, and shared mode when another worker wrote last). The cookie is taken as the
  key unchecked, and Redis runs no script: the least any library could do, not a way
  to keep sessions.

Needs the ``bench`` extra (Flask-Session).
"""

from __future__ import annotations

import os
import secrets
import socket
from urllib.parse import urlsplit

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


class _BareRedis:
    """One connection per process, commands packed by hand and replies parsed by
    hiredis: a round trip with next to nothing around it. A failure closes it (the
    next call connects again) and raises, as a session library's would."""

    TIMEOUT = 2.0  # seconds: a hung Redis fails the request, as everywhere here

    def __init__(self, url: str) -> None:
        self._url = urlsplit(url)
        self._sock: socket.socket | None = None
        self._pid = 0

    def call(self, *commands: tuple[str | int, ...]) -> list[object]:
        """Send ``commands`` in one write; their replies."""
        if self._sock is None or self._pid != os.getpid():  # (a fork: not the parent's)
            self._connect()
        assert self._sock is not None
        try:
            self._sock.sendall(b"".join(_pack(command) for command in commands))
            replies = [self._reply() for _ in commands]
        except BaseException:
            self.close()
            raise
        for reply in replies:
            if isinstance(reply, Exception):  # hiredis returns error replies
                raise reply
        return replies

    def _connect(self) -> None:
        import hiredis

        self._sock = socket.create_connection(
            (self._url.hostname, self._url.port), timeout=self.TIMEOUT
        )
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader, self._pid = hiredis.Reader(), os.getpid()
        if self._url.password:
            self.call(("AUTH", self._url.password))

    def _reply(self) -> object:
        assert self._sock is not None
        reply = self._reader.gets()
        while reply is False:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("Redis closed the connection")
            self._reader.feed(data)
            reply = self._reader.gets()
        return reply

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _pack(command: tuple[str | int, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        raw = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


def _floor(trips: int) -> Flask:
    """Routes that do ``trips`` round trips a write (and ``trips - 1`` a read); a
    write sets the idle expiry as it goes, as every session store does."""
    redis = _BareRedis(os.environ["STATESCALE_REDIS_URL"])
    app = Flask(__name__)
    app.session_interface = _NoSessions()
    app.extensions["floor_redis"] = redis  # (a test closes it)
    memory: dict[str, dict[str, str]] = {}  # (one round trip: reads from here)
    idle_ms = 1800 * 1000

    def key(cookie: str | None = None) -> str:
        return "floor:" + (cookie or request.cookies.get("statescale", ""))[:64]

    def stored() -> dict[str, str]:
        if trips == 1:
            return memory.get(key(), {})
        (pairs,) = redis.call(("HGETALL", key()))
        assert isinstance(pairs, list)
        return {k.decode(): v.decode() for k, v in zip(pairs[::2], pairs[1::2], strict=True)}

    @app.get("/health")
    def health() -> Response:
        return jsonify(pid=os.getpid(), ok=True)

    @app.get("/api/session")
    def read() -> Response:
        return jsonify(pid=os.getpid(), data=stored())

    @app.post("/api/incr")
    def incr() -> Response:
        name = request.args.get("key", "n")
        data = stored()
        value, _ = redis.call(("HINCRBY", key(), name, 1), ("PEXPIRE", key(), idle_ms))
        data[name] = str(value)
        if trips == 1:
            memory[key()] = data
        return jsonify(pid=os.getpid(), key=name, value=value)

    @app.post("/api/set")
    def set_value() -> Response:
        name = request.args.get("key", "k")
        value = request.args.get("value", "")
        cookie = request.cookies.get("statescale") or secrets.token_urlsafe(32)
        redis.call(("HSET", key(cookie), name, value), ("PEXPIRE", key(cookie), idle_ms))
        memory.setdefault(key(cookie), {})[name] = value
        response = jsonify(pid=os.getpid(), key=name, value=value)
        response.set_cookie("statescale", cookie)
        return response

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
    if name in ("floor1_app", "floor2_app"):
        return _floor(int(name[5]))
    raise AttributeError(name)
