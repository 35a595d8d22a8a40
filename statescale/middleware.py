"""``StateScaleMiddleware``: server-side sessions for any WSGI application.

It reads the signed session cookie, puts a lazy :class:`~statescale.session.Session` in
``environ["statescale.session"]``, and when the application starts its response writes
what changed to the store and adds ``Set-Cookie`` and ``Vary: Cookie`` where needed.

* A request that never touches the session costs no store round trip and gets no cookie.
* A forged, garbage or unknown cookie gives a fresh, empty session; never an error, and a
  validly signed ID the store does not know is never adopted.
* A store failure (:class:`~statescale.StoreError`) becomes ``503`` with ``Retry-After``
  and one log line that says why; no cookie is cleared or rotated because of it.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any

from werkzeug.wsgi import ClosingIterator

from .config import DEFAULT_MAX_SIZE, CookieOptions
from .cookies import CookieWriter, cookie_values
from .exceptions import ConfigError, StoreError
from .handoff import HANDOFF_PATH, MAX_HANDOFF, SEAL_HEADER, UNSEALED_HEAD_MAX
from .session import Changes, Record, Session
from .signing import SessionSigner, new_session_id
from .stores.base import Store
from .stores.memory import ProcessLocks

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("statescale")
events = logging.getLogger("statescale.sessions")

ENVIRON_KEY = "statescale.session"
OUTSIDE_KEY = "statescale.outside"  # the session was opened by open_outside
MAX_CANDIDATES = 8  # values of the session cookie's name checked per request, at most
_SEAL_ENVIRON = "HTTP_" + SEAL_HEADER.upper().replace("-", "_")
UNAVAILABLE_BODY = b"503 Service Unavailable: the session store is unavailable; retry shortly.\n"
_ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]

MULTIPROCESS_WARNING = (
    "statescale: %s keeps sessions in each worker process's memory, and this server runs "
    "several worker processes (wsgi.multiprocess) without sticky routing. A user's next "
    "request will often reach a worker that has never seen their session, so sessions "
    "will seem to reset and values will jump between workers. Use the Redis store "
    "(STATESCALE_STORE=redis) or sticky routing (STATESCALE_MODE=sticky)."
)


def get_session(environ: WSGIEnvironment) -> Session:
    """The session of the request ``environ`` belongs to."""
    session: Session = environ[ENVIRON_KEY]
    return session


class _Throttle:
    """At most one log line per ``interval`` seconds, counting the ones held back."""

    def __init__(self, interval: float = 1.0, level: int = logging.ERROR) -> None:
        self.interval = interval
        self.level = level
        self._next = 0.0
        self._held = 0

    def log(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        held, self._held, self._next = self._held, 0, now + self.interval
        suffix = f" (and {held} more since the last such line)" if held else ""
        log.log(self.level, msg + suffix, *args)


class StateScaleMiddleware:
    """Wrap ``app`` so that every request has a session kept in ``store``.

    Options (keyword-only):

    * ``secret_keys``: a list of keys, oldest first; the newest signs, all verify.
    * ``cookie``: :class:`~statescale.config.CookieOptions` (secure defaults).
    * ``max_size``: the largest encoded session in bytes.
    * ``locking``: serialize the requests of one session with the store's lock, so
      read-modify-write updates are never lost (costs two round trips).
    * ``process_locking``: serialize them within this process only, with no round trip:
      enough where a router sends every request of a session to one process (affinity
      mode), which may still run two of them at once on its threads.
    * ``id_factory``: mints session IDs (sticky routing mints IDs its node owns).
    * ``sticky``: say so when a per-process store sits behind sticky routing, which
      silences the several-workers warning.
    """

    def __init__(
        self,
        app: WSGIApplication,
        store: Store,
        *,
        secret_keys: Sequence[str | bytes],
        cookie: CookieOptions | None = None,
        max_size: int = DEFAULT_MAX_SIZE,
        locking: bool = False,
        process_locking: bool = False,
        id_factory: Callable[[], str] = new_session_id,
        sticky: bool = False,
    ) -> None:
        if not isinstance(store, Store):
            raise ConfigError(f"store must be a statescale store, not {type(store).__name__}")
        self.app = app
        self.store = store
        self.cookie = cookie or CookieOptions()
        self.max_size = max_size
        self.locking = locking
        self._process_locks = ProcessLocks() if process_locking else None
        self.sticky = sticky
        self.signer = SessionSigner(secret_keys, id_factory=id_factory)
        self._cookies = CookieWriter(self.cookie)
        # The version cookie: the newest version of the record this client has written,
        # so a store serving per-process copies never shows it an older one.
        self.version_cookie = replace(self.cookie, name=self.cookie.name + "_v")
        self._versions = CookieWriter(self.version_cookie)
        self._refresh_cookie = self.cookie.max_age is not None
        self._check_processes = not sticky  # until the first request from a multi-process server
        # A sticky node's ring peers call it here to take or give sessions (handoff.py).
        self._handoff = getattr(store, "handoff", None)
        self._outage_log = _Throttle()
        self._vanished_log = _Throttle(level=logging.WARNING)
        self._forged_log = _Throttle(interval=10.0, level=logging.WARNING)
        # Session life-cycle events name a session by a keyed hash: correlatable across
        # processes (same keys), useless to anyone who reads the log.
        self._log_key = hashlib.blake2b(
            self.signer.sign("log-key").encode(), digest_size=16
        ).digest()

    def log_outage(self, exc: StoreError) -> None:
        """One log line (at most one a second) saying why a request got a 503."""
        self._outage_log.log("statescale: answering 503: %s", exc)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self._handoff is not None and environ.get("PATH_INFO") == HANDOFF_PATH:
            return self._answer_handoff(environ, start_response)
        if self._check_processes and environ.get("wsgi.multiprocess"):
            self._check_processes = False
            if self.store.per_process:
                log.warning(MULTIPROCESS_WARNING, type(self.store).__name__)
        request = _Request(start_response, self._commit, self.log_outage)
        request.session = self._open(environ, request)
        environ[ENVIRON_KEY] = request.session
        try:
            app_iter = self.app(environ, request.start_response)
            if not request.started:  # a generator app starts its response lazily
                app_iter = request.prime(app_iter)
        except StoreError as exc:
            request.release()
            return request.unavailable(exc)
        except BaseException:
            request.release()
            raise
        if request.failed:
            _close(app_iter)
            return [UNAVAILABLE_BODY]
        return app_iter

    def open_outside(self, environ: WSGIEnvironment) -> Session:
        """The session of a request that does not pass through this middleware (Flask's
        ``test_request_context`` and ``session_transaction``). It takes no lock (nothing
        would be sure to release it); :meth:`save_outside` saves it."""
        session = self._open(environ, _Outside(_no_start, self._commit, self.log_outage))
        environ[ENVIRON_KEY] = session
        environ[OUTSIDE_KEY] = True
        return session

    def save_outside(self, session: Session) -> list[tuple[str, str]]:
        """Save a session :meth:`open_outside` opened; the headers (its cookies) that
        the response must carry."""
        try:
            return self._commit(session, [])[1]
        finally:
            session.close()

    def _answer_handoff(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        """A ring peer's sealed hand-off call; anything else there is a 404, and a call
        with a large body whose head is not sealed is refused before the body is read."""
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        reply, handoff = None, self._handoff
        head = environ.get(_SEAL_ENVIRON)
        if (
            environ.get("REQUEST_METHOD") == "POST"
            and 0 < length <= MAX_HANDOFF
            and handoff
            and (length <= UNSEALED_HEAD_MAX or handoff.sealer.head_ok(head, length))
        ):
            reply, sent = handoff.answer_over(environ["wsgi.input"].read(length))
        if reply is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        start_response(
            "200 OK",
            [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(reply)))],
        )
        return _Written(reply, sent)

    def _open(self, environ: WSGIEnvironment, request: _Request) -> Session:
        """The request's session, loaded (on first use) through ``request``'s lock."""
        header = environ.get("HTTP_COOKIE")
        verified = None
        # The first value that is signed by us: a duplicate of our cookie's name with
        # another value (another path's, or planted) cannot hide the real one.
        values = cookie_values(header, self.cookie.name)
        for value in values[:MAX_CANDIDATES]:
            verified = self.signer.unsign(value)
            if verified is not None:
                break
        if verified is None:
            if values:  # a forged, tampered or stale-keyed cookie: worth knowing about
                self._forged_log.log(
                    "statescale: a session cookie with a bad signature from %s (a forged or "
                    "guessed ID, or one signed by a key no longer listed); treated as none",
                    environ.get("REMOTE_ADDR", "an unknown address"),
                )
            return Session(None, self._loader(request, 0), max_size=self.max_size)
        versions = cookie_values(header, self.version_cookie.name)
        # ASCII digits only: "²".isdigit() is true, and int() refuses it.
        min_version = max(
            (int(v) for v in versions if v.isascii() and v.isdigit() and len(v) < 19), default=0
        )
        return Session(
            verified.session_id,
            self._loader(request, min_version),
            max_size=self.max_size,
            stale=verified.stale,
        )

    def _loader(self, request: _Request, min_version: int) -> Callable[[str], Record | None]:
        """Loads a session from the store, under its lock first when ``locking``."""
        store = self.store
        # A store that hands sessions between processes (sticky hand-over) is told
        # which ones a request holds, through the same lock, with or without locking.
        locking = self.locking or getattr(store, "holds_sessions", False)
        locks = self._process_locks  # else, affinity's: this process's lock alone

        def load(session_id: str) -> Record | None:
            if locking:
                request.hold(store.lock(session_id))
            elif locks is not None:
                request.hold(locks.lock(session_id))
            return store.load(session_id, min_version=min_version)

        return load

    def _commit(
        self, session: Session, app_headers: list[tuple[str, str]]
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """Save what the request changed. The response's headers with it: the app's
        (its Cache-Control made private when a session ID goes out), and the session's."""
        plan = session.plan()
        headers = [("Vary", "Cookie")] if session.accessed else []
        session_id, version, cookie = plan.session_id, 0, plan.cookie
        if plan.create is not None:
            session_id, version = self._create(session, plan.create, plan.drop)
        elif plan.update is not None and session_id is not None:
            saved = self.store.save(session_id, plan.update, created=session.created or 0.0)
            if saved is None:  # the record vanished underneath: see _vanished
                session_id, version, cookie = self._vanished(session, session_id, plan.update)
            else:
                version = saved
        elif plan.drop is not None:
            self.store.delete(plan.drop)
            self._event("destroyed", plan.drop)
        if cookie is None and self._refresh_cookie and session_id is not None:
            cookie = "set"  # a Max-Age cookie slides with the session
        if cookie == "set" and session_id is not None:
            headers.append(("Set-Cookie", self._cookies.set(self.signer.sign(session_id))))
        elif cookie == "clear":
            headers.append(("Set-Cookie", self._cookies.clear))
            headers.append(("Set-Cookie", self._versions.clear))
        if version:
            headers.append(("Set-Cookie", self._versions.set(str(version))))
        if cookie is None:
            return app_headers, headers
        # A response that carries a session ID must not be cached for others: not even
        # where the app said public (the browser may still keep it, as the app asked).
        own = [v for k, v in app_headers if k.lower() == "cache-control"]
        if not own:
            headers.append(("Cache-Control", 'private, no-cache="Set-Cookie"'))
            return app_headers, headers
        headers.append(("Cache-Control", _private(", ".join(own))))
        return [(k, v) for k, v in app_headers if k.lower() != "cache-control"], headers

    def _event(self, what: str, session_id: str, other: str | None = None) -> None:
        """One line on the ``statescale.sessions`` logger (INFO) for a session's life
        cycle: created, regenerated (also when a vanished record's write moves to a new
        ID), destroyed."""
        if events.isEnabledFor(logging.INFO):
            named = self._named(session_id)
            if other is None:
                events.info("session %s %s", named, what)
            else:
                events.info("session %s %s (was %s)", named, what, self._named(other))

    def _named(self, session_id: str) -> str:
        return hashlib.blake2b(session_id.encode(), key=self._log_key, digest_size=8).hexdigest()

    def _create(
        self, session: Session, fields: Mapping[str, bytes], replaces: str | None
    ) -> tuple[str, int]:
        """Store ``fields`` as a new record under a fresh ID; the ID and its version."""
        session_id = self.signer.new_id()
        written = self.store.create(session_id, fields, created=session.created, replaces=replaces)
        session.bind(session_id, written.created)
        self._event("created" if replaces is None else "regenerated", session_id, replaces)
        return session_id, written.version

    def _vanished(
        self, session: Session, session_id: str, changes: Changes
    ) -> tuple[str | None, int, str]:
        """A write found its record gone (flushed, evicted, deleted by an operator: a
        forced logout). The store wrote nothing and dropped every copy. What this
        request wrote, and only that, becomes a fresh session under a new ID: nothing
        the request did not write comes back, and the client's next request sees
        exactly what the store holds. A request that only deleted keys leaves no
        session. Returns the new ID, its version and what to do with the cookie."""
        self._vanished_log.log(
            "statescale: a session's record was gone when a request wrote to it (flushed, "
            "evicted or deleted); saved only what the request wrote, under a new ID"
        )
        if not changes.set:
            return None, 0, "clear"
        session.created = None
        new_id, version = self._create(session, changes.set, session_id)
        return new_id, version, "set"


class _Request:
    """One request's state: its session, the lock it holds, whether its response has
    started. It talks to the middleware through the two callables it is given:
    ``commit`` (save the session; the app's headers to send, and the session's) and
    ``log_outage``."""

    __slots__ = (
        "_added",
        "_commit",
        "_committed",
        "_lock",
        "_log_outage",
        "_start",
        "failed",
        "session",
        "started",
    )

    def __init__(
        self,
        start: StartResponse,
        commit: Callable[
            [Session, list[tuple[str, str]]],
            tuple[list[tuple[str, str]], list[tuple[str, str]]],
        ],
        log_outage: Callable[[StoreError], None],
    ) -> None:
        self._start = start
        self._commit = commit
        self._log_outage = log_outage
        self._lock: AbstractContextManager[None] | None = None
        self._committed = False
        self._added: list[tuple[str, str]] = []  # the session's headers, once committed
        self.started = False
        self.failed = False
        self.session: Session

    def hold(self, lock: AbstractContextManager[None]) -> None:
        """Take ``lock`` (once) and keep it until the response starts or fails. Not
        once the response has started: nothing this request does is saved any more,
        and nothing would release it."""
        if self._lock is None and not self._committed:
            lock.__enter__()
            self._lock = lock

    def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.__exit__(None, None, None)

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: _ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        self.started = True
        if self.failed:  # the 503 stands: what the app sends now goes nowhere
            return _discard
        if not self._committed:
            self._committed = True
            try:
                app_headers, self._added = self._commit(self.session, headers)
            except StoreError as exc:
                self.failed = True
                self._log_outage(exc)
                self._start(*unavailable_response(exc), exc_info)
                return _discard  # the app's own body must not follow the 503's headers
            finally:
                self.release()
                self.session.close()  # saved (or not): later changes are refused
            headers = app_headers + self._added
        else:  # a response started again (exc_info): with the session's headers still
            headers = headers + [h for h in self._added if h not in headers]
        return self._start(status, headers, exc_info)

    def prime(self, app_iter: Iterable[bytes]) -> Iterable[bytes]:
        """Run a lazy app up to its first chunk, so the response has started (and been
        committed) before the server sees anything."""
        iterator: Iterator[bytes] = iter(app_iter)
        first = b""
        try:
            while not self.started and not first:  # empty chunks may come before it
                first = next(iterator)
        except StopIteration:
            first = b""
        except BaseException:
            _close(app_iter)
            raise
        return ClosingIterator(itertools.chain((first,), iterator), [lambda: _close(app_iter)])

    def unavailable(self, exc: StoreError) -> Iterable[bytes]:
        self._log_outage(exc)
        if self.started:  # the response went out already; nothing better to do
            raise exc
        self.started = self.failed = True
        self._start(*unavailable_response(exc))
        return [UNAVAILABLE_BODY]


class _Outside(_Request):
    """A request that does not pass through the middleware: it holds no lock."""

    __slots__ = ()

    def hold(self, lock: AbstractContextManager[None]) -> None:
        pass


class _Written:
    """A hand-off reply as a WSGI body that tells ``sent`` whether the server wrote it:
    a server asks for the next piece only once it has written the one before, and
    closes the body in any case."""

    def __init__(self, reply: bytes, sent: Callable[[bool], None]) -> None:
        self._reply, self._sent, self._written = reply, sent, False

    def __iter__(self) -> Iterator[bytes]:
        yield self._reply
        self._written = True

    def close(self) -> None:
        self._sent(self._written)


def _no_start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    raise AssertionError("a session opened outside the middleware starts no response")


_SHARED = ("public", "s-maxage")


def _private(cache_control: str) -> str:
    """``cache_control`` for this client alone: ``private``, without what lets a shared
    cache keep it."""
    directives = (d.strip() for d in cache_control.split(","))
    dropped = (*_SHARED, "private")
    kept = [d for d in directives if d and d.partition("=")[0].strip().lower() not in dropped]
    return ", ".join(["private", *kept])


def unavailable_response(exc: StoreError) -> tuple[str, list[tuple[str, str]]]:
    """Status and headers of the 503 a store error becomes (body: UNAVAILABLE_BODY)."""
    return "503 Service Unavailable", [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(UNAVAILABLE_BODY))),
        ("Retry-After", str(exc.retry_after)),
        ("Cache-Control", "no-store"),
    ]


def _discard(data: bytes) -> None:
    """The ``write`` an app gets once its response has become a 503."""


def _close(iterable: Any) -> None:
    close = getattr(iterable, "close", None)
    if close is not None:
        close()
