"""Sticky sessions handed from one worker to the next that serves the same slot.

Under one gunicorn master in sticky mode, slot ``k``'s sessions live in the memory of
the worker serving slot ``k``. A worker that is replaced gracefully (a ``HUP`` reload,
``USR2`` then ``TERM`` of the old master, ``--max-requests`` recycling) hands them to
the worker that follows it in its slot. Only a crash loses a slot's sessions.

The workers of one slot (two at most, while one replaces the other) share a private
directory (mode 0700), which outlives the master, so the new master of a ``USR2``
upgrade finds the old one's workers there:

* Each worker serves ``<pid>.sock`` there from a thread. A worker that meets a valid
  cookie for a session it does not hold asks its peers (``give``); the one holding it
  removes it and sends it back, after any request of its own that holds the session
  has ended. So a session has one holder at a time, and moves to where its requests
  arrive: during an upgrade, the old and new masters' routers both serve, and a
  session follows its user between them.
* A worker that stops writes what it still holds to ``<pid>.json`` (atomically), then
  closes its socket. A worker that misses a session after that claims the file
  (renames it) and takes in every session in it.

In flight: between the old worker's last request and the new one's first, a session is
in the old worker's memory, then in its file: never nowhere. A request for it on the
new worker waits for the hand-over (one Unix-socket round trip, or the file: under a
millisecond for a session, tens of milliseconds for 10,000 in a file).

Every message and file carries an HMAC-SHA256 under the newest signing key, so only a
process that holds the keys can take or plant sessions.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .exceptions import ConfigError
from .routing.balancers._base import BackendRing
from .session import Changes, Record, Written
from .stores.memory import MemoryStore

log = logging.getLogger("statescale")

#: Seconds a ``give`` waits for the holder's own request of that session to end, and
#: a peer waits for an answer.
GIVE_WAIT = 5.0
_MAX_MESSAGE = 64 * 1024 * 1024
#: The largest hand-off call a node's middleware reads.
MAX_HANDOFF = _MAX_MESSAGE

#: Where a node's middleware answers its ring peers' hand-off calls.
HANDOFF_PATH = "/.statescale/handoff"

_handoffs: list[Handoff] = []  # this process's, for the exit hooks


def private_directory(path: Path) -> Path:
    """``path``, made 0700 if new; refused if another user owns it or others may
    write in it (someone could plant sockets or files there)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigError(f"{path}: the hand-off directory must be this user's, mode 0700")
    return path


class _Mac:
    def __init__(self, key: bytes) -> None:
        self._key = hashlib.sha256(b"statescale handoff\x00" + key).digest()

    def seal(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).hexdigest().encode() + b" " + body

    def open(self, sealed: bytes) -> bytes | None:
        mac, _, body = sealed.partition(b" ")
        expected = hmac.new(self._key, body, hashlib.sha256).hexdigest().encode()
        return body if hmac.compare_digest(mac, expected) else None


def _encode(record: Record) -> dict[str, Any]:
    return {"f": {k: v.decode() for k, v in record.fields.items()}, "c": record.created}


def _decode(data: Mapping[str, Any]) -> Record:
    return Record({k: v.encode() for k, v in data["f"].items()}, float(data["c"]))


class Handoff:
    """This worker's part in its slot's hand-overs (:class:`HandoffStore` is its store;
    :meth:`stop` hands everything over)."""

    def __init__(
        self,
        memory: MemoryStore,
        key: bytes,
        *,
        directory: Path | None = None,
        peers: RemotePeers | None = None,
        name: str | None = None,
    ) -> None:
        self.memory = memory
        self._mac = _Mac(key)
        self.peers = peers
        # Files and sockets are named by pid (a test runs several in one process, each
        # ``<pid>-<name>``): a socket whose pid is gone was left by a crash.
        self._name = str(os.getpid()) if name is None else f"{os.getpid()}-{name}"
        self._in_use: dict[str, int] = {}  # session -> requests of this process holding it
        self._cond = threading.Condition()
        self._stopped = False
        self._handed = threading.Event()  # the file is written
        self.directory = None if directory is None else private_directory(directory)
        self._listener: socket.socket | None = None
        if self.directory is not None:
            self._path = self.directory / f"{self._name}.sock"
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
            self._listener.bind(str(self._path))
            self._listener.listen(16)
            threading.Thread(target=self._serve, name="statescale-handoff", daemon=True).start()
        _handoffs.append(self)

    # -- the requests of this process ----------------------------------------------------
    @contextmanager
    def holding(self, session_id: str) -> Iterator[None]:
        """While a request of this process holds ``session_id`` (the middleware holds
        it from its load until the response starts, when the session is saved), no
        peer takes it."""
        with self._cond:
            self._in_use[session_id] = self._in_use.get(session_id, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                left = self._in_use.pop(session_id) - 1
                if left:
                    self._in_use[session_id] = left
                self._cond.notify_all()

    def load(self, session_id: str) -> Record | None:
        """The session from this worker's memory, else from a peer or a file."""
        record = self.memory.load(session_id)
        if record is not None or self._stopped:
            return record
        found: Record | None = None
        if self.directory is not None:
            found = self._ask_peers(session_id) or self._claim_files(session_id)
        if found is None and self.peers is not None:
            found = self.peers.fetch(session_id, self._mac)
        if found is None:
            return None
        self.memory.create(session_id, found.fields, created=found.created, replaces=session_id)
        return self.memory.load(session_id)

    # -- giving ----------------------------------------------------------------------------
    def _serve(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed: stopped
            with conn:
                try:
                    conn.settimeout(GIVE_WAIT + 1)
                    reply = self.answer(_read_all(conn))
                    if reply is not None:
                        conn.sendall(reply)
                except (OSError, ValueError) as exc:
                    log.warning("statescale: a hand-off request failed: %s", exc)

    def answer(self, sealed: bytes) -> bytes | None:
        """A peer's sealed request, answered sealed (``None``: refused). ``give``: the
        session, taken from here; ``take``: sessions for this node to keep."""
        body = self._mac.open(sealed)
        if body is None:
            log.warning("statescale: refused a hand-off request with a bad signature")
            return None
        request = json.loads(body)
        if "take" in request:
            for session_id, data in request["take"].items():
                if not self.memory.holds(session_id):
                    given = _decode(data)
                    self.memory.create(
                        session_id, given.fields, created=given.created, replaces=session_id
                    )
            return self._mac.seal(b"{}")
        taken = self._take(request["give"])
        reply = json.dumps({"record": None if taken is None else _encode(taken)})
        return self._mac.seal(reply.encode())

    def _take(self, session_id: str) -> Record | None:
        """Remove and return a session, once no request of this process holds it."""
        deadline = time.monotonic() + GIVE_WAIT
        with self._cond:
            if not self._stopped and not self.memory.holds(session_id):
                return None  # (a request here may miss it too: it asks, it does not hold)
            while self._in_use.get(session_id) and not self._stopped:
                if not self._cond.wait(deadline - time.monotonic()):
                    return None  # held too long: keep it here
            if not self._stopped:
                return self.memory.take(session_id)
        self._handed.wait(GIVE_WAIT)  # stopping: once the file is there, the asker looks
        return None

    # -- asking ----------------------------------------------------------------------------
    def _peers(self) -> Iterator[Path]:
        assert self.directory is not None
        for path in self.directory.glob("*.sock"):
            if path != self._path:
                yield path

    def _ask_peers(self, session_id: str) -> Record | None:
        request = self._mac.seal(json.dumps({"give": session_id}).encode())
        for path in self._peers():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                    conn.settimeout(GIVE_WAIT + 1)
                    conn.connect(str(path))
                    conn.sendall(request)
                    conn.shutdown(socket.SHUT_WR)
                    body = self._mac.open(_read_all(conn))
            except (ConnectionRefusedError, FileNotFoundError):
                _remove_if_dead(path)
                continue
            except OSError as exc:
                log.warning("statescale: asking %s for a session failed: %s", path.name, exc)
                continue
            if body is None:
                continue
            data = json.loads(body)["record"]
            if data is not None:
                return _decode(data)
        return None

    def _claim_files(self, wanted: str | None) -> Record | None:
        """Take in every session of the files that stopped workers left; the one
        ``wanted``, if it was there."""
        found = None
        if self.directory is None:
            return None
        for path in self.directory.glob("*.json"):
            claimed = path.with_suffix(f".claimed-{self._name}")
            try:
                path.rename(claimed)  # one worker takes a file
                sealed = claimed.read_bytes()
            except OSError:
                continue
            body = self._mac.open(sealed)
            if body is None:  # not ours to take: leave it for whoever holds its key
                log.warning("statescale: ignored hand-off file %s: bad signature", path.name)
                with contextlib.suppress(OSError):
                    claimed.rename(path)
                continue
            with contextlib.suppress(OSError):
                claimed.unlink()
            sessions = json.loads(body)["sessions"]
            for session_id, data in sessions.items():
                record = _decode(data)
                if session_id == wanted:
                    found = record
                elif self.memory.load(session_id) is None:
                    self.memory.create(
                        session_id, record.fields, created=record.created, replaces=session_id
                    )
            log.info("statescale: took in %d sessions handed over in %s", len(sessions), path.name)
        return found

    def take_over(self) -> None:
        """At start: the sessions in any files waiting here."""
        self._claim_files(None)

    # -- stopping --------------------------------------------------------------------------
    def stop(self) -> None:
        """Hand over what this worker holds: its file first, then close its socket (so
        a peer that finds the socket gone finds the file)."""
        with self._cond:
            if self._stopped:
                return
            self._stopped = True
            self._cond.notify_all()
            sessions = {sid: _encode(record) for sid, record in self.memory.items()}
        if self.directory is None:
            if self.peers is not None and sessions:
                self.peers.push(sessions, self._mac)
            log.info("statescale: handed over %d sessions to their next owners", len(sessions))
            return
        if sessions:
            body = json.dumps({"sessions": sessions}).encode()
            temporary = self.directory / f"{self._name}.tmp"
            temporary.write_bytes(self._mac.seal(body))
            temporary.rename(self.directory / f"{self._name}.json")
        self._handed.set()
        if self._listener is not None:
            self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        log.info("statescale: handed over %d sessions (%s)", len(sessions), self._name)


class RemotePeers:
    """The other nodes of a sticky ring, over HTTP (``POST HANDOFF_PATH`` on each node's
    own address, where its middleware answers).

    A node that misses a session asks the nodes the ring ranks above it for that
    session (they may have left the routers' ring while still running: a scale-in),
    then the one ranked just below it (the owner before this node joined). A node that
    stops gracefully sends each session it holds to its owner on the ring without it.
    """

    def __init__(self, ring: BackendRing, node: str, *, timeout: float = 1.0) -> None:
        self.ring = ring
        self.node = node
        self.timeout = timeout
        self._address = {b.name: (b.host, b.port) for b in ring.backends}

    def candidates(self, session_id: str) -> list[str]:
        ranking: list[str] = []
        with contextlib.suppress(LookupError):
            while len(ranking) < len(self._address):
                ranking.append(self.ring.owner(session_id, down=ranking))
        here = ranking.index(self.node) if self.node in ranking else len(ranking)
        return ranking[:here] + ranking[here + 1 : here + 2]

    def fetch(self, session_id: str, mac: _Mac) -> Record | None:
        request = mac.seal(json.dumps({"give": session_id}).encode())
        for name in self.candidates(session_id):
            reply = self._post(name, request, mac)
            data = None if reply is None else json.loads(reply).get("record")
            if data is not None:
                return _decode(data)
        return None

    def push(self, sessions: Mapping[str, Any], mac: _Mac) -> None:
        """Each session to its owner on the ring without this node."""
        by_owner: dict[str, dict[str, Any]] = {}
        for session_id, data in sessions.items():
            with contextlib.suppress(LookupError):
                owner = self.ring.owner(session_id, down=[self.node])
                by_owner.setdefault(owner, {})[session_id] = data
        for owner, batch in by_owner.items():
            if self._post(owner, mac.seal(json.dumps({"take": batch}).encode()), mac) is None:
                log.warning("statescale: %d sessions could not be handed to %s", len(batch), owner)

    def _post(self, name: str, sealed: bytes, mac: _Mac) -> bytes | None:
        host, port = self._address[name]
        conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        try:
            conn.request("POST", HANDOFF_PATH, body=sealed)
            response = conn.getresponse()
            body = response.read(_MAX_MESSAGE)
        except OSError as exc:
            log.info("statescale: hand-off call to %s failed: %s", name, exc)
            return None
        finally:
            conn.close()
        return mac.open(body) if response.status == 200 else None


class HandoffStore:
    """The memory store, with sessions it misses fetched from its slot's peers."""

    name = "memory"
    per_process = True

    def __init__(self, handoff: Handoff) -> None:
        self.handoff = handoff
        self.memory = handoff.memory

    def load(self, session_id: str, *, min_version: int = 0) -> Record | None:
        return self.handoff.load(session_id)

    def save(self, session_id: str, changes: Changes, *, created: float) -> int | None:
        return self.memory.save(session_id, changes, created=created)

    def create(
        self,
        session_id: str,
        fields: Mapping[str, bytes],
        *,
        created: float | None = None,
        replaces: str | None = None,
    ) -> Written:
        return self.memory.create(session_id, fields, created=created, replaces=replaces)

    def delete(self, session_id: str) -> None:
        self.memory.delete(session_id)

    #: The middleware holds each session it loads (:meth:`lock`) until the response
    #: starts, whether or not locking was asked for.
    holds_sessions = True

    @contextmanager
    def lock(self, session_id: str) -> Iterator[None]:
        with self.memory.lock(session_id), self.handoff.holding(session_id):
            yield


def _read_all(conn: socket.socket) -> bytes:
    chunks, size = [], 0
    while chunk := conn.recv(65536):
        chunks.append(chunk)
        size += len(chunk)
        if size > _MAX_MESSAGE:
            raise ValueError("hand-off message too large")
    return b"".join(chunks)


def _remove_if_dead(path: Path) -> None:
    """A socket left by a worker that crashed."""
    try:
        pid = int(path.stem.partition("-")[0])
        os.kill(pid, 0)
    except ProcessLookupError:
        with contextlib.suppress(OSError):
            path.unlink()
    except (ValueError, PermissionError):
        pass


def stop_all() -> None:
    """Hand over every session this process holds (the gunicorn ``worker_exit`` hook)."""
    while _handoffs:
        _handoffs.pop().stop()
