"""Sticky sessions handed from one process to the next that owns them.

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
* A master started with another worker count (a restart, or an upgrade) gives sessions
  other slots: a miss reads every slot's files, one process of the node at a time (a
  ``flock``), keeps what its slot owns and relays the rest to their slots' directories;
  during the upgrade, a worker asks the other master's workers too.

Sticky nodes behind a balancer do the same over HTTP (:class:`RemotePeers`): a node
that misses a session asks the nodes its ring ranks around it, and a node that stops
sends what it holds to the sessions' next owners. A node that may well hold the session
(its owner now or lately, or where this node gave it) and cannot answer just then (no
answer in time, its router without a worker for the call) counts as busy.

In flight: between the old worker's last request and the new one's first, a session is
in the old worker's memory, then in its file: never nowhere. A request for it on the
new worker waits for the hand-over (one Unix-socket round trip, or the file: under a
millisecond for a session, tens of milliseconds for 10,000 in a file). A request that
finds it nowhere while a peer says it is busy (on its way to the asker, or held there
by a request past the wait) gets a 503 (:class:`HandoffBusy`), never an empty session.
A worker that stops first lets the requests holding sessions save (and answers that
took one be sent), then writes its file; a write after that is refused with a 503.

A session keeps its expiry and its place in the store (returned or not) across a hand-over, and its
count of writes: a copy that arrives late or twice (a leaving node's push racing its
next owner's fetch) never replaces a newer one (:meth:`MemoryStore.put`).

Every message and file carries an HMAC-SHA256 under each signing key, and a process
that knows any of them opens it (a key rotation does not cut old and new workers off).
A request also carries its time and a nonce, answered only within ``MAX_AGE`` seconds
and once, and the answer repeats the nonce: a captured call cannot be replayed to take
a session again, nor a captured answer passed off for another session. Over HTTP a
call's head is sealed too (``SEAL_HEADER``: its time and length), and a node reads no
body over ``UNSEALED_HEAD_MAX`` of a call whose head is not. The node-to-node calls are
plain HTTP, as the Redis traffic is: keep both on a private network.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import http.client
import json
import logging
import os
import secrets
import socket
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .exceptions import ConfigError, StoreUnavailable
from .routing.balancers import BackendRing
from .routing.membership.fleet import Fleet
from .session import Changes, Record, Written
from .signing import DEFAULT_COOKIE_NAME
from .stores.memory import UNCOUNTED, Kept, MemoryStore

log = logging.getLogger("statescale")

#: Seconds a process waits for a peer's answer (a slot's worker, or a node). The peer
#: waits for its own request that holds the session only as long as the asker waits,
#: less a margin: a session is never taken for an asker that has given up.
ASK_TIMEOUT = 3.0
_MARGIN = 0.5
#: Seconds a sealed request stays valid (against replays; clocks must agree this well).
MAX_AGE = 30.0
#: The largest hand-off message read, from a socket or by a node's middleware.
MAX_HANDOFF = 16 * 1024 * 1024
#: Sessions given away whose new holder a node remembers.
MAX_GONE = 10_000
#: Nodes ranked below this one that it asks for a session it misses: its owner before
#: this node joined, and before the others that joined with it.
MAX_BELOW = 3
#: Nodes a node asks, at most, for one session it misses.
MAX_ASKED = 8
#: Seconds a hand-off file that cannot be read (out of descriptors...) counts as
#: holding the session asked for (busy); past that, as one without it.
UNSURE_FOR = 10.0
#: A stopping node sends its sessions in batches of about this many bytes.
_BATCH = 4 * 1024 * 1024
#: Statuses that say a call was not taken: statescale's refusal (404), and a node's own
#: router that sent it nowhere (503: no worker to take it, or too many connections).
#: A hand-over refused so is sent to the next owner; a session asked for so is busy
#: there, not gone (its holder may be restarting).
_NOT_TAKEN = frozenset({404, 503})
#: A router's answer to a body over its limit: a hand-over sent again in halves.
_TOO_LARGE = 413
#: The status of a call that reached no server, and of one that got no answer.
_NO_CONNECTION, _NO_ANSWER = -1, 0

#: Where a node's middleware answers its ring peers' hand-off calls.
HANDOFF_PATH = "/.statescale/handoff"
#: The header of such a call that says, before its body is read, that a key holder
#: sent it (:meth:`Sealer.head`): a call without it is refused unread, unless its body
#: is at most ``UNSEALED_HEAD_MAX`` bytes (a node from before the header asking for a
#: session, during a rolling upgrade: no more than a request's head costs to read).
SEAL_HEADER = "X-Statescale-Seal"
UNSEALED_HEAD_MAX = 64 * 1024

_handoffs: list[Handoff] = []  # this process's, for the exit hooks
#: What every request carries and no answer does.
_REQUEST_KEYS = frozenset({"t", "give", "take"})


class HandoffBusy(StoreUnavailable):
    """A session this process misses is on its way between processes, or held by a
    request elsewhere: not known to be gone, so the request gets a 503 and comes back,
    rather than a fresh session and its cookie cleared."""

    def __init__(self) -> None:
        super().__init__("the memory store", "a session is on its way between processes")


def private_directory(path: Path) -> Path:
    """``path``, made 0700 if new; refused if another user owns it or others may
    write in it (someone could plant sockets or files there)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigError(f"{path}: the hand-off directory must be this user's, mode 0700")
    return path


class Sealer:
    """HMAC-SHA256 seals under keys derived from the signing keys. Requests carry a
    time and a nonce, each accepted once."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ConfigError("hand-overs need at least one signing key")
        self._keys = [hashlib.sha256(b"statescale handoff\x00" + k).digest() for k in keys]
        self._seen: set[str] = set()  # the nonces of requests opened lately
        self._expiring: deque[tuple[float, str]] = deque()  # (when it stops mattering, nonce)
        self._lock = threading.Lock()

    def seal(self, body: bytes) -> bytes:
        """``body`` with a MAC under each key: a process that knows any of them opens
        it (during a rotation, old and new processes know different lists)."""
        return b",".join(self._mac(key, body) for key in self._keys) + b" " + body

    def open(self, sealed: bytes) -> bytes | None:
        macs, _, body = sealed.partition(b" ")
        ours = [self._mac(key, body) for key in self._keys]
        for mac in macs.split(b",")[:8]:
            if any(hmac.compare_digest(mac, expected) for expected in ours):
                return body
        return None

    @staticmethod
    def _mac(key: bytes, body: bytes) -> bytes:
        return hmac.new(key, body, hashlib.sha256).hexdigest().encode()

    def head(self, length: int) -> str:
        """The ``SEAL_HEADER`` of a call whose sealed body is ``length`` bytes: a MAC of
        the time and the length, which a node checks before it reads the body."""
        stamp = f"{int(time.time())}.{length}"
        return (
            stamp + "." + ",".join(self._mac(k, stamp.encode())[:32].decode() for k in self._keys)
        )

    def head_ok(self, head: str | None, length: int) -> bool:
        """Whether ``head`` came from a key holder lately, for a body of ``length``
        bytes (the body's own seal is checked once it is read)."""
        stamp, _, macs = (head or "").rpartition(".")
        when, _, said = stamp.partition(".")
        if not (when.isascii() and when.isdigit()) or said != str(length):  # ("²" is a digit)
            return False
        if len(when) > 12 or abs(time.time() - int(when)) > MAX_AGE:
            return False
        ours = [self._mac(key, stamp.encode())[:32] for key in self._keys]
        return any(
            hmac.compare_digest(mac, expected)
            for mac in macs.encode("ascii", "replace").split(b",")[:8]
            for expected in ours
        )

    def request(self, **message: Any) -> tuple[bytes, str]:
        """A sealed request and its nonce."""
        nonce = secrets.token_urlsafe(16)
        body = json.dumps({**message, "t": time.time(), "n": nonce}).encode()
        return self.seal(body), nonce

    def open_request(self, sealed: bytes) -> dict[str, Any] | None:
        """A request's message, if sealed by a key holder, fresh, and not seen before."""
        body = self.open(sealed)
        if body is None:
            return None
        message = json.loads(body)
        if not isinstance(message, dict):
            return None
        now, nonce = time.time(), str(message.get("n"))
        if abs(now - float(message.get("t", 0))) > MAX_AGE:
            return None
        with self._lock:
            if nonce in self._seen:
                return None
            expiring = self._expiring  # in the order seen: the oldest first
            while expiring and expiring[0][0] < now:
                self._seen.discard(expiring.popleft()[1])
            self._seen.add(nonce)
            expiring.append((now + 2 * MAX_AGE, nonce))
        return message

    def answer(self, nonce: str, **message: Any) -> bytes:
        return self.seal(json.dumps({**message, "n": nonce}).encode())

    def open_answer(self, sealed: bytes, nonce: str) -> dict[str, Any] | None:
        """The answer to the request with ``nonce``, and no other."""
        body = self.open(sealed)
        if body is None:
            return None
        message = json.loads(body)
        if not isinstance(message, dict) or message.get("n") != nonce:
            return None
        if _REQUEST_KEYS & message.keys():  # a request echoed back is no answer
            return None
        return message


def _encode(kept: Kept) -> dict[str, Any]:
    fields = {k: v.decode() for k, v in kept.record.fields.items()}
    return {
        "f": fields,
        "c": kept.record.created,
        "e": kept.expires,
        "r": kept.returned,
        "v": kept.version,
    }


def _decode(data: Mapping[str, Any]) -> Kept:
    fields = {str(k): str(v).encode() for k, v in data["f"].items()}
    record = Record(fields, float(data["c"]))
    return Kept(record, float(data["e"]), bool(data["r"]), int(data.get("v", UNCOUNTED)))


class Handoff:
    """This process's part in the hand-overs: the slot directory's socket and files
    (``directory``), the ring's other nodes (``peers``), or both.
    :class:`HandoffStore` is its store; :meth:`stop` hands everything over."""

    def __init__(
        self,
        memory: MemoryStore,
        keys: Sequence[bytes],
        *,
        directory: Path | None = None,
        peers: RemotePeers | None = None,
        slots: tuple[BackendRing, str] | None = None,
        name: str | None = None,
    ) -> None:
        self.memory = memory
        self.sealer = Sealer(keys)
        self.peers = peers
        # A node with several workers: its ring of worker slots and this one's. Peers'
        # sessions for another slot are relayed to that slot's directory.
        self.slots = slots
        # Files and sockets are named by pid (a test runs several in one process, each
        # ``<pid>-<name>``): a socket whose pid is gone was left by a crash.
        self._name = str(os.getpid()) if name is None else f"{os.getpid()}-{name}"
        self._in_use: dict[str, int] = {}  # session -> requests of this process holding it
        self._cond = threading.Condition()
        self._claiming = threading.Lock()  # one thread takes in files at a time
        self._unopenable: set[tuple[Path, int, int]] = set()  # files of other keys, as seen
        # Files in another slot's directory holding only its sessions, as seen: theirs.
        self._theirs: dict[tuple[Path, int, int], frozenset[str]] = {}
        self._unread_since: dict[Path, float] = {}  # files whose reads fail: since when
        self._taking = 0  # turns taking in files under way (stop() waits for them)
        # Sessions given to a node, and its address: while routers disagree (a
        # balancer's old workers still use the old ring), a request for one may come
        # back here, and is fetched back from there (the old ring does not know it).
        self._gone_to: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._pushing: dict[str, tuple[str, int]] = {}  # on their way to a peer: where
        self._fetching: dict[str, int] = {}  # session -> threads here asking peers for it
        self._answering = 0  # sessions taken for a peer whose answer is not sent yet
        self._stopped = False
        self._closed = False  # stop() has taken what this process holds: no more writes
        self._handed = threading.Event()  # what is left is where peers will look
        self._handing = self._again = False  # a hand-over thread runs; asked again since
        self._member = peers is not None and peers.node in peers.fleet.ring.names
        if peers is not None:
            peers.fleet.listeners.append(self.ring_changed)
        self.directory = None if directory is None else private_directory(directory)
        # One process of the node takes in files at a time (every slot's directory is
        # read): the lock is the node's with slots, else this directory's.
        if self.directory is not None:
            root = self.directory.parent if slots is not None else self.directory
            self._lock_path = root / ".taking-in"
        self._listener: socket.socket | None = None
        if self.directory is not None:
            self._path = self.directory / f"{self._name}.sock"
            if len(str(self._path).encode()) > 100:
                raise ConfigError(
                    f"the hand-off socket {self._path} is too long for a Unix socket: "
                    "set TMPDIR to a short path"
                )
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
            self._listener.bind(str(self._path))
            self._listener.listen(16)
            threading.Thread(target=self._serve, name="statescale-handoff", daemon=True).start()
        _handoffs.append(self)

    # -- the requests of this process ----------------------------------------------------
    @contextmanager
    def writing(self) -> Iterator[None]:
        """A write to this process's memory, unless it has handed its sessions over
        already (a request that outlived its worker's stop): then a 503, never a write
        that is acknowledged and lost. The next worker has the session as it was."""
        with self._cond:
            if self._closed:
                raise StoreUnavailable("the memory store", "this worker has handed over")
            yield

    @contextmanager
    def holding(self, session_id: str) -> Iterator[None]:
        """While a request of this process holds ``session_id`` (the middleware holds
        it from its load until the response starts, when the session is saved), no
        peer takes it."""
        with self._cond:  # one on its way to a peer is not served here until it lands
            if not self._cond.wait_for(lambda: session_id not in self._pushing, ASK_TIMEOUT):
                raise HandoffBusy()  # neither here nor there yet: not to be served twice
            self._in_use[session_id] = self._in_use.get(session_id, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                left = self._in_use.pop(session_id) - 1
                if left:
                    self._in_use[session_id] = left
                self._cond.notify_all()
                # Out of the fleet (leaving, or a router that has not followed yet sent
                # this request here): the session goes on to its owner at once.
                leaving = self.peers is not None and not self._member and not self._stopped
            if leaving and not left:
                self._hand_over_soon()

    def load(self, session_id: str) -> Record | None:
        """The session from this process's memory, else from a peer or a file. Raises
        :class:`HandoffBusy` when a peer said it is on its way, or held there too long,
        and it is nowhere else: not gone, so not to be answered as gone."""
        record = self.memory.load(session_id)
        if record is not None or self._stopped:
            return record
        with self._cond:
            self._fetching[session_id] = self._fetching.get(session_id, 0) + 1
        try:
            record, busy = self._fetch(session_id)
        finally:
            with self._cond:
                left = self._fetching.pop(session_id) - 1
                if left:
                    self._fetching[session_id] = left
        if record is None and busy:
            raise HandoffBusy()
        return record

    def _fetch(self, session_id: str) -> tuple[Record | None, bool]:
        """:meth:`load`'s asking: the session, and whether a peer said it was busy."""
        busy = False
        if self.directory is not None:
            found, busy = self._ask_slot(session_id)
            if found is not None:
                busy = self._put(session_id, found)
            else:
                with self._taking_in() as turn:
                    record = self.memory.load(session_id)  # (another thread took it in)
                    if record is not None:
                        return record, False
                    found, unread = self._claim_files(session_id) if turn else (None, True)
                    if found is not None:
                        busy = self._put(session_id, found) or busy
                    busy = busy or unread
            record = self.memory.load(session_id)
            if record is not None or self.peers is None:
                return record, busy and record is None
            # None here, or only a copy older than one given away: the peers are asked.
        if self.peers is None:
            return None, False
        with self._cond:  # on its way to a peer: once there, ask that peer first
            self._cond.wait_for(lambda: session_id not in self._pushing, ASK_TIMEOUT)
            gone_to = self._gone_to.get(session_id)
        found, asked_busy = self.peers.fetch(session_id, self.sealer, first=gone_to)
        if found is not None or not asked_busy:  # (busy: asked there first again, on retry)
            with self._cond:
                if self._gone_to.get(session_id) == gone_to:
                    self._gone_to.pop(session_id, None)
        if found is None:  # a stopping peer may have sent it here meanwhile
            record = self._arrived(session_id)
            return record, (busy or asked_busy) and record is None
        stale = self._put(session_id, found)
        record = self.memory.load(session_id)
        return record, stale and record is None

    def _put(self, session_id: str, kept: Kept) -> bool:
        """Keep a copy handed over, unless this process knows a newer one. Whether it
        was refused as older than one this process gave away: that one is somewhere
        else (a duplicate copy came back), so the session is busy, not gone."""
        if self.memory.put(session_id, kept):
            return False
        log.info("statescale: dropped a copy of a session older than one known here")
        return self.memory.superseded(session_id, kept)

    def _arrived(self, session_id: str) -> Record | None:
        """``session_id``, if a peer's hand-over brought it while this process asked."""
        if self.directory is not None:
            with self._taking_in() as turn:
                found, _ = self._claim_files(session_id) if turn else (None, True)
            if found is not None:
                self._put(session_id, found)
        return self.memory.load(session_id)

    # -- answering -------------------------------------------------------------------------
    def _serve(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed: stopped
            with conn:
                taken: tuple[str, Kept] | None = None
                sent = False
                try:
                    conn.settimeout(ASK_TIMEOUT)
                    reply, taken = self._answer(_read_all(conn), local=True)
                    if reply is not None:
                        conn.sendall(reply)
                        sent = True
                except (OSError, ValueError) as exc:
                    log.warning("statescale: a hand-off request failed: %s", exc)
                finally:
                    if taken is not None:
                        self._answered(taken, sent)

    def answer(self, sealed: bytes) -> bytes | None:
        """A peer's sealed request, answered sealed (``None``: refused), and taken for
        sent. ``give``: the session, taken from here; ``take``: sessions to keep."""
        reply, sent = self.answer_over(sealed)
        sent(True)
        return reply

    def answer_over(self, sealed: bytes) -> tuple[bytes | None, Callable[[bool], None]]:
        """:meth:`answer` for a server that sends the reply later: call the function
        with whether the reply was written, and a session it took goes back into
        memory if not (the asker has nothing)."""
        reply, taken = self._answer(sealed)
        if taken is None:
            return reply, lambda sent: None
        called = threading.Lock()

        def sent(written: bool) -> None:
            if called.acquire(blocking=False):  # once
                self._answered(taken, written)

        return reply, sent

    def _answered(self, taken: tuple[str, Kept], sent: bool) -> None:
        """An answer that took a session has been sent; or not, and the session goes
        back into memory (the asker has nothing). :meth:`stop` waits for these."""
        late: dict[str, Any] = {}
        with self._cond:
            if not sent:
                session_id, kept = taken
                self._gone_to.pop(session_id, None)
                if self._closed:  # stop() has written what it held: it goes on its own
                    late[session_id] = _encode(kept)
                else:
                    self._put(session_id, kept)
            self._answering -= 1
            self._cond.notify_all()
        if late:
            self._hand_on(late, f"{self._name}-late-{secrets.token_hex(4)}")

    def _hand_on(self, sessions: Mapping[str, Any], name: str) -> None:
        """``sessions`` (encoded) where peers will look for them: a file ``name`` of
        this slot's directory; or, without one or on a node leaving the fleet, the
        ring's next owners, and what none of them took to that file all the same (a
        later start at this address finds it)."""
        if self.peers is not None and (self.directory is None or self._leaving()):
            maybe: set[str] = set()  # (a node may have kept them: not kept here too)
            delivered = self.peers.push(sessions, self.sealer, maybe=maybe)
            sessions = {s: d for s, d in sessions.items() if s not in delivered.keys() | maybe}
            if sessions and self.directory is None:
                log.warning("statescale: %d sessions no node took are lost", len(sessions))
        if sessions and self.directory is not None:
            self._write_file(self.directory, name, sessions)

    def _write_file(self, there: Path, name: str, sessions: Mapping[str, Any]) -> None:
        """``sessions`` (encoded) as the sealed file ``name`` in directory ``there``:
        written aside, then renamed, so a reader finds the whole file or none."""
        temporary = there / f"{name}.tmp"
        temporary.write_bytes(self.sealer.seal(json.dumps({"sessions": sessions}).encode()))
        temporary.rename(there / f"{name}.json")

    def _answer(
        self, sealed: bytes, *, local: bool = False
    ) -> tuple[bytes | None, tuple[str, Kept] | None]:
        """:meth:`answer`, and the session it took (counted in ``_answering`` until
        :meth:`_answered`). ``local``: asked by a worker of this node, which reads the
        node's files itself."""
        try:
            request = self.sealer.open_request(sealed)
            if request is None:
                log.warning("statescale: refused a hand-off request: bad seal, stale or replayed")
                return None, None
            nonce = request["n"]
            meant_for = request.get("to")  # the node it is for: not to be replayed to another
            if meant_for is not None and (self.peers is None or meant_for != self.peers.node):
                log.warning("statescale: refused a hand-off request meant for %s", meant_for)
                return None, None
            if "take" in request:
                with self._cond:
                    if self._closed:  # past stop()'s last look: they would be lost here
                        log.warning("statescale: refused a hand-over: this process has stopped")
                        return None, None
                    self._answering += 1  # stop() waits for it to be kept
                try:
                    self._keep(dict(request["take"]))
                finally:
                    with self._cond:
                        self._answering -= 1
                        self._cond.notify_all()
                        closed = self._closed
                if closed:  # stop() gave up waiting for it: kept here, they would be lost
                    log.warning("statescale: refused a hand-over: this process stopped meanwhile")
                    return None, None
                return self.sealer.answer(nonce), None
            session_id = str(request["give"])
            if not local and not self.memory.holds(session_id):
                self._take_in_files()  # it may wait in one (this slot's worker reloaded)
            asker = request.get("from")
            to = None if asker is None else (str(asker[0]), int(asker[1]))
            # The asker's deadline, on this clock too: clocks may differ (by up to
            # MAX_AGE), and a session taken after the asker gave up would be lost.
            sent = min(float(request["t"]), time.time())
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            log.warning("statescale: refused a malformed hand-off request: %r", exc)
            return None, None
        taken, at, busy = self._take(session_id, to, sent + ASK_TIMEOUT - _MARGIN)
        if taken is not None and to is not None:
            with self._cond:
                self._remember(session_id, to)
        record = None if taken is None else _encode(taken)
        extra = {"busy": True} if busy else {}
        reply = self.sealer.answer(nonce, id=session_id, record=record, at=at, **extra)
        return reply, None if taken is None else (session_id, taken)

    def _remember(self, session_id: str, to: tuple[str, int]) -> None:
        """Where a session went (under ``_cond``)."""
        self._gone_to[session_id] = to
        self._gone_to.move_to_end(session_id)
        while len(self._gone_to) > MAX_GONE:
            self._gone_to.popitem(last=False)

    def _keep(self, sessions: Mapping[str, Any]) -> None:
        """Sessions a peer hands over: kept here, or, on a node with several workers,
        relayed to the directory of the slot that owns each (its worker claims them)."""
        for session_id, data in self._relay(sessions).items():
            self.memory.put(str(session_id), _decode(data))  # (not over a newer copy)

    def _relay(self, sessions: Mapping[str, Any], keep: str | None = None) -> dict[str, Any]:
        """Write each of ``sessions`` (encoded) that another slot of this node owns to
        a file in that slot's directory; the rest (and ``keep``, which a request here
        asks for), to keep here. A slot that cannot be written to: kept here too, where
        a request for it that still comes here finds it."""
        here: dict[str, Any] = {}
        relay: dict[str, dict[str, Any]] = {}
        ring, mine = self.slots or (None, None)
        for session_id, data in sessions.items():
            owner = None if ring is None or session_id == keep else ring.owner(str(session_id))
            (here if owner in (None, mine) else relay.setdefault(owner, {}))[session_id] = data
        for slot, batch in relay.items():
            assert self.directory is not None
            name = f"{self._name}-relay-{secrets.token_hex(4)}"
            try:
                self._write_file(private_directory(self.directory.parent / slot), name, batch)
            except (OSError, ConfigError) as exc:
                log.warning(
                    "statescale: could not relay %d sessions to %s: %s", len(batch), slot, exc
                )
                here.update(batch)
        return here

    def _take(
        self, session_id: str, asker: tuple[str, int] | None, until: float
    ) -> tuple[Kept | None, tuple[str, int] | None, bool]:
        """Remove and return a session, once no request of this process holds it, if
        that happens before ``until`` (the asker's deadline, epoch seconds); or, if it
        has just been sent elsewhere, where. Last, whether it is busy here: held by a
        request too long, or on its way to this process (a thread here is asking for
        it): the asker must not take it for gone."""
        with self._cond:
            going = self._pushing.get(session_id)
            if going is not None and going != asker:  # it lands there first
                self._cond.wait_for(lambda: session_id not in self._pushing, until - time.time())
                if not self.memory.holds(session_id):
                    return None, self._gone_to.get(session_id), False
            if not self._stopped and not self.memory.holds(session_id):
                # A request here may miss it too: it asks, it does not hold. If that
                # request was answered already, the session may be on its way here.
                return None, None, session_id in self._fetching
            while self._in_use.get(session_id) and not self._stopped:
                if not self._cond.wait(max(0.0, until - time.time())):
                    return None, None, True  # held too long: kept here, for now
            if not self._stopped:
                if time.time() >= until:
                    return None, None, True  # the asker has given up: keep it here
                kept = self.memory.take(session_id)
                if kept is not None:
                    self._answering += 1  # until sent: stop() waits for it
                return kept, None, False
            # Stopping: what is here goes to the slot's file (or the next owners).
            here = self.memory.holds(session_id) or bool(self._in_use.get(session_id))
        if not here:
            return None, None, False
        # Once handed on, the asker looks there; until then it is busy, not gone.
        return None, None, not self._handed.wait(max(0.0, until - time.time()))

    # -- asking ----------------------------------------------------------------------------
    def _ask_slot(self, session_id: str) -> tuple[Kept | None, bool]:
        """The session from this slot's other worker, if it holds it; and whether one
        said it was busy (see :meth:`_take`)."""
        assert self.directory is not None
        busy = False
        # This slot's other worker first; then the other slots' workers of another
        # master (two masters of different worker counts, during an upgrade, route one
        # session to two slots). This master's own route by one ring: not asked.
        master = _parent_of(self._name)
        others = [
            path
            for there in self._slot_directories()
            for path in there.glob("*.sock")
            if master is None or _parent_of(path.stem) != master  # (unknown: asked)
        ]
        for path in [*self.directory.glob("*.sock"), *others]:
            if path == self._path:
                continue
            request, nonce = self.sealer.request(give=session_id)
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                    conn.settimeout(ASK_TIMEOUT)
                    conn.connect(str(path))
                    conn.sendall(request)
                    conn.shutdown(socket.SHUT_WR)
                    answer = self.sealer.open_answer(_read_all(conn), nonce)
            except (ConnectionRefusedError, FileNotFoundError):
                _remove_if_dead(path)
                continue
            except (TimeoutError, ConnectionResetError, BrokenPipeError) as exc:
                # It is there and did not answer (frozen, or stopped mid-answer): it may
                # hold the session, which must not be taken for gone.
                log.warning("statescale: %s did not answer for a session: %r", path.name, exc)
                busy = True
                continue
            except (OSError, ValueError) as exc:
                log.warning("statescale: asking %s for a session failed: %s", path.name, exc)
                continue
            found = _given(answer, session_id)
            if found is not None:
                return found, False
            busy = busy or _busy(answer)
        return None, busy

    @contextmanager
    def _taking_in(self) -> Iterator[bool]:
        """This process's turn to take in the node's files: one thread of it and one
        process of the node (a ``flock``), each waited for within ``ASK_TIMEOUT``, and
        only until :meth:`stop` writes what this process holds (which waits for a turn
        under way). Whether it was had: else the files are left as they are."""
        deadline = time.monotonic() + ASK_TIMEOUT
        if not self._claiming.acquire(timeout=ASK_TIMEOUT):
            yield False
            return
        try:
            with _locked(self._lock_path, max(0.0, deadline - time.monotonic())) as locked:
                with self._cond:
                    turn = locked and not self._closed
                    self._taking += turn
                try:
                    yield turn
                finally:
                    with self._cond:
                        self._taking -= turn
                        self._cond.notify_all()
        finally:
            self._claiming.release()

    def _claim_files(self, wanted: str | None, *, relay: bool = True) -> tuple[Kept | None, bool]:
        """Take in the sessions of the files that stopped processes left, in any slot
        directory of this node (a worker count that changed moves sessions between
        slots), in :meth:`_taking_in`'s turn; with ``relay``, each session another slot
        owns goes on to that slot's directory. The one ``wanted``, if it was there; and
        whether it may be where this process could not look (a file it could not
        read): busy, not gone."""
        found, unread = None, False
        took: dict[str, Any] = {}  # what went into this process's memory, encoded
        for path in self._files():
            sessions, kept, failed = self._open_file(path, wanted, relay=relay)
            unread = unread or failed
            if not sessions:
                continue
            claimed = path.with_suffix(f".claimed-{self._name}")
            try:  # (a crash from here on leaves it claimed: taken in again at start)
                path.rename(claimed)
            except OSError:
                continue
            here = self._relay(sessions, keep=wanted) if relay else sessions
            for session_id in here:
                if session_id == wanted:  # (in two files: the newer)
                    if found is None or kept[session_id].version > found.version:
                        found = kept[session_id]
                elif self.memory.put(session_id, kept[session_id]):  # (not over a newer)
                    took[session_id] = here[session_id]
            with contextlib.suppress(OSError):  # once relayed: never nowhere
                claimed.unlink()
            log.info("statescale: took in %d sessions handed over in %s", len(sessions), path.name)
        with self._cond:
            closed = self._closed
        if closed and (took or found is not None):  # stop() gave up waiting for this turn
            if found is not None:
                took[str(wanted)] = _encode(found)
            self._hand_on(took, f"{self._name}-late-{secrets.token_hex(4)}")
            return None, True
        return found, unread and found is None

    def _open_file(
        self, path: Path, wanted: str | None, *, relay: bool
    ) -> tuple[dict[str, Any], dict[str, Kept], bool]:
        """A hand-off file's sessions (encoded, and decoded) for :meth:`_claim_files`
        to take in: none for one of other keys, or, with ``relay``, one in another
        slot's directory that holds that slot's sessions only and not ``wanted`` (its
        worker takes it in; without ``relay``, the node is leaving and takes all).
        Last, whether it could not be read (and counts as busy)."""
        ring = None if self.slots is None else self.slots[0]
        slot = path.parent.name
        theirs = relay and ring is not None and path.parent != self.directory and slot in ring.names
        try:
            seen = path.stat()
            mark = (path, seen.st_size, seen.st_mtime_ns)
            if mark in self._unopenable:
                return {}, {}, False
            if theirs and (held := self._theirs.get(mark)) is not None and wanted not in held:
                return {}, {}, False
            sealed = path.read_bytes()
        except FileNotFoundError:
            return {}, {}, False
        except OSError as exc:  # (out of descriptors...): it may hold the session
            return {}, {}, self._unreadable(path, exc)
        self._unread_since.pop(path, None)
        try:
            body = self.sealer.open(sealed)
            if body is None:
                raise ValueError("bad signature")
            sessions = dict(json.loads(body)["sessions"])
            kept = {session_id: _decode(data) for session_id, data in sessions.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("statescale: ignored hand-off file %s: %s", path.name, exc)
            self._unopenable.add(mark)  # (left for whoever holds its key)
            return {}, {}, False
        if (
            theirs
            and wanted not in sessions
            and ring is not None
            and all(ring.owner(session_id) == slot for session_id in sessions)
        ):
            if len(self._theirs) >= 256:
                self._theirs.clear()
            self._theirs[mark] = frozenset(sessions)
            return {}, {}, False
        return sessions, kept, False

    def _unreadable(self, path: Path, exc: OSError) -> bool:
        """A file that could not be read may hold a session asked for: busy, for
        ``UNSURE_FOR`` seconds of failed reads; past that, taken for one without it."""
        log.warning("statescale: could not read hand-off file %s: %s", path, exc)
        since = self._unread_since.setdefault(path, time.monotonic())
        return time.monotonic() - since < UNSURE_FOR

    def _files(self) -> list[Path]:
        """The hand-off files to take in: this slot's first, then the other slots'."""
        assert self.directory is not None
        return [p for there in self._directories() for p in there.glob("*.json")]

    def _directories(self) -> list[Path]:
        """This slot's directory, then the other slots' of this node."""
        assert self.directory is not None
        return [self.directory, *self._slot_directories()]

    def _slot_directories(self) -> list[Path]:
        """The directories of this node's slots but this one's, whatever the worker
        count that made them (``worker<k>``); none for a process with no slots."""
        if self.directory is None or self.slots is None:
            return []
        return sorted(
            there
            for there in self.directory.parent.glob("worker*")
            if there != self.directory and there.name[6:].isdigit() and there.is_dir()
        )

    def _take_in_files(self, *, relay: bool = True) -> None:
        """Every session waiting in the node's files for this process, into memory
        (none without a directory, or if its turn could not be had)."""
        if self.directory is None:
            return
        with self._taking_in() as turn:
            if turn:
                self._claim_files(None, relay=relay)

    def take_over(self) -> None:
        """At start: the sessions in any files waiting here, and the leftovers of
        processes that crashed half-way: a file half written is removed, one half
        taken in is taken in again (a copy already relayed from it is no newer). In
        every slot's directory: a worker count that changed leaves some slots unowned."""
        if self.directory is not None:
            for path in [p for there in self._directories() for p in there.iterdir()]:
                claimed = ".claimed-" in path.name
                owner = path.suffix.partition("-")[2] if claimed else path.stem
                if (claimed or path.suffix == ".tmp") and _dead(owner):
                    with contextlib.suppress(OSError):
                        if claimed:
                            path.rename(path.with_suffix(".json"))
                        else:
                            path.unlink()
        self._take_in_files()

    # -- leaving the fleet ---------------------------------------------------------------
    def ring_changed(self, names: Sequence[str]) -> None:
        """The fleet's ring is now ``names`` (its follower's thread calls this). When
        this node has left it (its master deregistered it: a scale-in), hand its
        sessions on at once, while it still answers: a request for one that still
        arrives here (a router yet to follow) fetches it back."""
        assert self.peers is not None
        member, self._member = self._member, self.peers.node in names
        if member and not self._member:
            self._hand_over_soon()

    def _hand_over_soon(self) -> None:
        """:meth:`hand_over` on a thread: one at a time, and once more after it if asked
        meanwhile (while a node is out of the ring, each request's end asks)."""
        with self._cond:
            if self._handing:
                self._again = True
                return
            self._handing = True
        threading.Thread(
            target=self._hand_over_while_asked, name="statescale-leaving", daemon=True
        ).start()

    def _hand_over_while_asked(self) -> None:
        while True:
            try:
                self.hand_over()
            except Exception:  # (a thread's end: logged, and the next ask starts another)
                log.exception("statescale: handing sessions on failed")
            with self._cond:
                if not self._again:
                    self._handing = False
                    return
                self._again = False

    def hand_over(self) -> None:
        """Send every session no request holds to its next owner on the ring. While one
        is on its way, a request here for it waits, and so does a peer asking for it,
        unless that peer is where it goes (it gets it at once: the copy that arrives
        later finds it held, and is dropped)."""
        if self.peers is None:
            return
        self._take_in_files(relay=False)  # (every slot of this node hands its own on)
        with self._cond:
            if self._stopped:
                return
            free = {
                s: k
                for s, k in self.memory.items()
                if not self._in_use.get(s) and s not in self._pushing  # (another thread's)
            }
            targets = {s: t for s in free if (t := self.peers.target(s)) is not None}
            self._pushing.update(targets)
        delivered: dict[str, tuple[str, int]] = {}

        def landed(batch: Mapping[str, tuple[str, int]]) -> None:
            """A batch arrived: its sessions leave here at once, not when every batch
            has (a request here waits for one on its way, ASK_TIMEOUT at most)."""
            with self._cond:
                for session_id, where in batch.items():
                    # Unless a request wrote it meanwhile: the newer copy stays, and
                    # goes at the next hand-over.
                    if self.memory.take(session_id, free[session_id].version) is not None:
                        self._remember(session_id, where)
                    self._pushing.pop(session_id, None)
                delivered.update(batch)
                self._cond.notify_all()

        try:
            encoded = {sid: _encode(free[sid].moved()) for sid in targets}
            self.peers.push(encoded, self.sealer, landed=landed)
        finally:
            with self._cond:
                # Only those still on their way: one that landed may be on its way
                # again by now (fetched back, and handed on by another thread).
                for session_id in targets.keys() - delivered.keys():
                    self._pushing.pop(session_id, None)
                self._cond.notify_all()
        log.info("statescale: left the fleet; handed %d sessions on", len(delivered))

    # -- stopping --------------------------------------------------------------------------
    def _leaving(self) -> bool:
        """Whether this node's master leaves the fleet for good (its workers hand their
        sessions to the fleet, not to their slots' successors)."""
        return self.directory is not None and (
            leaving_mark(self.directory.parent, os.getppid()).exists()
        )

    def stop(self) -> None:
        """Hand over what this process holds: to its slot's file first, then close its
        socket (a peer that finds the socket gone finds the file); or to the ring's
        next owners."""
        leaving = self._leaving()
        if leaving and self.peers is not None:  # what waits in files goes too
            self._take_in_files(relay=False)
        with self._cond:
            if self._stopped:
                return
            self._stopped = True
            self._cond.notify_all()
            # First let hand-overs in flight land (or come back here), answers that took
            # a session be sent (or put it back), and requests holding one save it: a
            # thread pool's requests may outlive gunicorn's graceful timeout.
            self._cond.wait_for(
                lambda: not (self._pushing or self._answering or self._in_use or self._taking),
                ASK_TIMEOUT,
            )
            sessions = {sid: _encode(kept.moved()) for sid, kept in self.memory.items()}
            self._closed = True  # what is written here now would be lost: refused
        if self.directory is None or (leaving and self.peers is not None):
            if self.peers is not None and sessions:
                self._hand_on(sessions, self._name)  # (what none took: to this slot's file)
            self._handed.set()
            log.info("statescale: handed over %d sessions to their next owners", len(sessions))
            return
        if sessions:
            self._hand_on(sessions, self._name)
        self._handed.set()
        if self._listener is not None:
            self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        log.info("statescale: handed over %d sessions (%s)", len(sessions), self._name)


def leaving_mark(root: Path, master: int) -> Path:
    """The file by which a node's master, leaving the fleet for good, tells its
    workers to hand their sessions to the fleet rather than to their slots' successors."""
    return root / f"leaving-{master}"


def _busy(answer: Mapping[str, Any] | None) -> bool:
    """Whether a ``give`` answer says the session is busy there (see ``Handoff._take``)."""
    return answer is not None and answer.get("busy") is True


def _given(answer: Mapping[str, Any] | None, session_id: str) -> Kept | None:
    """The session in a ``give`` answer, if it is that session's."""
    if answer is None or answer.get("id") != session_id or answer.get("record") is None:
        return None
    try:
        return _decode(answer["record"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class RemotePeers:
    """The other nodes of a sticky ring, over HTTP (``POST HANDOFF_PATH`` on each node's
    own address, where its middleware answers).

    A node that misses a session asks, at most ``MAX_ASKED`` of them: the nodes the ring
    ranks above it (they may have left the routers' ring while still running: a
    scale-in), its owners on the rings the fleet replaced lately, the ``MAX_BELOW``
    ranked below it (the owner before this node joined, and before others that joined
    with it), and nodes that left lately. A node that leaves the fleet, or stops
    gracefully, sends each session it holds to its owner on the ring without it.
    Take a node out of the routers before stopping it (with a registry, its master
    does): while it still runs, its sessions' next owners fetch them as their users
    arrive. Run nodes with a thread to
    spare (``gunicorn --threads 2``): one whose only thread waits on a peer cannot
    answer that peer's call at the same time.
    """

    def __init__(
        self,
        fleet: Fleet,
        node: str,
        *,
        cookie: str = DEFAULT_COOKIE_NAME,
        timeout: float = ASK_TIMEOUT,
    ) -> None:
        self.fleet = fleet
        self.node = node
        self.cookie = cookie
        self.timeout = timeout

    def candidates(self, session_id: str) -> list[str]:
        """Who may hold ``session_id``, in the order to ask: the nodes the ring ranks
        above this one, its owners on the rings the fleet replaced lately (newest
        first: a membership change moved it), the ``MAX_BELOW`` nodes below this one,
        then nodes that left lately."""
        ring, ranking = self.fleet.ring, list[str]()
        with contextlib.suppress(LookupError):
            while len(ranking) < len(ring.backends):
                ranking.append(ring.owner(session_id, down=ranking))
        here = ranking.index(self.node) if self.node in ranking else len(ranking)
        previous = self.fleet.previous
        owners = [ring.owner(session_id) for ring in previous]
        gone = [b.name for ring in previous for b in ring.backends if b.name not in ranking]
        # Below this node: its owner before this node joined, and, if others joined at
        # the same time, the owner before them.
        below = ranking[here + 1 : here + 1 + MAX_BELOW]
        asked: dict[str, None] = {}
        for name in (*ranking[:here], *owners, *below, *gone):
            if name != self.node:
                asked.setdefault(name)
        return list(asked)

    def fetch(
        self, session_id: str, sealer: Sealer, *, first: tuple[str, int] | None = None
    ) -> tuple[Kept | None, bool]:
        """Ask ``first`` (where this node gave the session), then the candidates: the
        session, and whether a node said it was busy there."""
        where = self.fleet.address
        mine = where(self.node)
        here = list(mine) if mine is not None else None
        names: dict[tuple[str, int], str] = {}
        for name in self._known():  # the ring's own first: a port may have been reused
            if (address := where(name)) is not None:
                names.setdefault(address, name)
        addresses = [a for a in map(where, self.candidates(session_id)) if a is not None]
        if first is not None:
            addresses = [first, *(a for a in addresses if a != first)]
        # The session's ID as its cookie would carry it (unsigned: only routers read
        # it), so a node's own router sends the call to the worker that holds it.
        routed = {"Cookie": f"{self.cookie}={session_id}.handoff"}
        asked: set[tuple[str, int]] = set()
        busy = False
        # Where it may well be: where this node gave it, and its owners on the ring and
        # on the rings the fleet replaced lately. One of them that cannot answer now
        # (its router without a worker for the call, its workers restarting; no answer
        # in time) makes it busy, never a fresh session. The others are asked only in
        # case (a join, a scale-in): one of them sick must not make every miss a 503.
        likely = {first} if first is not None else set()
        with contextlib.suppress(LookupError):
            for ring in (self.fleet.ring, *self.fleet.previous):
                owner = where(ring.owner(session_id))
                if owner is not None and owner != mine:
                    likely.add(owner)
        while addresses:
            address = addresses.pop(0)
            if address in asked or len(asked) >= MAX_ASKED:
                continue
            asked.add(address)
            # Named for the node asked, when it is known: a call captured on the wire is
            # refused by any other node (each remembers only the nonces it has seen).
            message: dict[str, Any] = {"give": session_id}
            if here:
                message["from"] = here
            if address in names:
                message["to"] = names[address]
            request, nonce = sealer.request(**message)
            status, answer = self._post(address, request, nonce, sealer, routed)
            found = _given(answer, session_id)
            if found is not None:
                return found, False
            unsure = status not in (200, _NO_CONNECTION, 404)  # (no answer, or no word)
            busy = busy or _busy(answer) or (unsure and address in likely)
            at = answer.get("at") if answer else None
            if isinstance(at, list) and len(at) == 2:  # just handed on: ask there
                likely.add((str(at[0]), int(at[1])))
                addresses.insert(0, (str(at[0]), int(at[1])))
        return None, busy

    def _known(self) -> list[str]:
        """Every node of the ring and of the rings it replaced lately."""
        rings = [self.fleet.ring, *self.fleet.previous]
        return list(dict.fromkeys(b.name for ring in rings for b in ring.backends))

    def _next_owner(
        self, ring: BackendRing, session_id: str, passed: Sequence[str] = ()
    ) -> str | None:
        """Who ``session_id`` goes to when this node hands it on: its owner on
        ``ring`` without this node (which may have left it already) and the nodes
        ``passed`` over."""
        down = [*passed, self.node] if self.node in ring.names else list(passed)
        try:
            return ring.owner(session_id, down=down)
        except LookupError:
            return None

    def target(self, session_id: str) -> tuple[str, int] | None:
        """Where this node hands ``session_id`` on."""
        owner = self._next_owner(self.fleet.ring, session_id)
        return None if owner is None else self.fleet.address(owner)

    def push(
        self,
        sessions: Mapping[str, Any],
        sealer: Sealer,
        *,
        landed: Callable[[Mapping[str, tuple[str, int]]], None] | None = None,
        maybe: set[str] | None = None,
    ) -> dict[str, tuple[str, int]]:
        """Each session to its owner on the ring without this node, in batches (each
        one that arrives told to ``landed`` at once); a node that refuses the
        connection (nothing was sent) or the sessions (it has stopped, or holds other
        keys) is passed over for the next owner, as routers pass it over. Where each
        session that arrived went; into ``maybe``, those of batches that got no answer
        or an error (a node may have kept them: sent nowhere else)."""
        delivered: dict[str, tuple[str, int]] = {}
        maybe = set() if maybe is None else maybe
        ring = self.fleet.ring
        passed: list[str] = []
        pending = dict(sessions)
        while pending:
            by_owner: dict[str, list[tuple[str, Any]]] = {}
            for session_id, data in pending.items():
                owner = self._next_owner(ring, session_id, passed)
                if owner is not None:  # (else no node left: not handed)
                    by_owner.setdefault(owner, []).append((session_id, data))
            pending = {}
            for owner, items in by_owner.items():
                where = self.fleet.address(owner)
                if where is None:
                    continue
                refused = self._push_to(
                    owner, where, items, sealer, delivered=delivered, landed=landed, maybe=maybe
                )
                if refused:
                    log.warning(
                        "statescale: %s refused a hand-over: %d sessions go to their next "
                        "owners", owner, len(refused),
                    )  # fmt: skip
                    passed.append(owner)
                    pending.update(refused)
        return delivered

    def _push_to(
        self,
        owner: str,
        where: tuple[str, int],
        items: list[tuple[str, Any]],
        sealer: Sealer,
        *,
        delivered: dict[str, tuple[str, int]],
        landed: Callable[[Mapping[str, tuple[str, int]]], None] | None,
        maybe: set[str],
    ) -> dict[str, Any]:
        """``items`` to ``owner`` in batches; what it did not take, from the first
        batch it did not take on."""
        batch: dict[str, Any] = {}
        size = 0
        for n, (session_id, data) in enumerate(items, 1):
            batch[session_id] = data
            size += len(json.dumps(data)) + 64  # as sent: escapes can be 12 bytes a char
            if size >= _BATCH or n == len(items):
                refused = self._send(owner, where, batch, sealer, (delivered, maybe))
                arrived = {s: where for s in batch if s in delivered}
                if landed is not None and arrived:
                    landed(arrived)
                if refused:  # not taken there: the next owner
                    return {**refused, **dict(items[n:])}
                batch, size = {}, 0
        return {}

    def _send(
        self,
        owner: str,
        where: tuple[str, int],
        batch: dict[str, Any],
        sealer: Sealer,
        into: tuple[dict[str, tuple[str, int]], set[str]],
    ) -> dict[str, Any]:
        """One batch to ``owner``, in halves if its router finds it too large: what it
        refused (to go to the next owner). What it took goes into ``into``'s first
        (delivered), what it may have kept into its second."""
        delivered, maybe = into
        request, nonce = sealer.request(take=batch, to=owner)
        status, answer = self._post(where, request, nonce, sealer)
        if status == _TOO_LARGE and len(batch) > 1:  # refused unread: sent again, halved
            items = list(batch.items())
            half = len(items) // 2
            return {
                **self._send(owner, where, dict(items[:half]), sealer, into),
                **self._send(owner, where, dict(items[half:]), sealer, into),
            }
        if status in (_NO_CONNECTION, *_NOT_TAKEN, _TOO_LARGE) or (
            status == 200 and answer is None
        ):
            return batch
        if status == 200:
            delivered.update(dict.fromkeys(batch, where))
        else:  # it may have kept them: not sent to another node too (two holders)
            log.warning("statescale: %d sessions not handed to %s", len(batch), owner)
            maybe.update(batch)
        return {}

    def _post(
        self,
        address: tuple[str, int],
        request: bytes,
        nonce: str,
        sealer: Sealer,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, Any] | None]:
        """The call's HTTP status (:data:`_NO_CONNECTION` if the connection could not be
        made, :data:`_NO_ANSWER` if none came: the call may have been acted on) and
        its answer, if a 200 sealed for this call."""
        host, port = address
        conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        try:
            conn.connect()
        except OSError as exc:
            log.info("statescale: hand-off call to %s:%d failed: %s", host, port, exc)
            conn.close()
            return _NO_CONNECTION, None
        try:
            sent = {**(headers or {}), SEAL_HEADER: sealer.head(len(request))}
            conn.request("POST", HANDOFF_PATH, body=request, headers=sent)
            response = conn.getresponse()
            body = response.read(MAX_HANDOFF)
        except (OSError, http.client.HTTPException) as exc:
            log.info("statescale: hand-off call to %s:%d failed: %s", host, port, exc)
            return _NO_ANSWER, None
        finally:
            conn.close()
        if response.status != 200:
            log.info("statescale: hand-off call to %s:%d answered %d", host, port, response.status)
            return response.status, None
        try:
            return 200, sealer.open_answer(body, nonce)
        except ValueError:
            return 200, None


class HandoffStore:
    """The memory store, with sessions it misses fetched from the process or node
    that held them before."""

    name = "memory"
    per_process = True

    def __init__(self, handoff: Handoff) -> None:
        self.handoff = handoff
        self.memory = handoff.memory

    def load(self, session_id: str, *, min_version: int = 0) -> Record | None:
        return self.handoff.load(session_id)

    def save(self, session_id: str, changes: Changes, *, created: float) -> int | None:
        with self.handoff.writing():
            return self.memory.save(session_id, changes, created=created)

    def create(
        self,
        session_id: str,
        fields: Mapping[str, bytes],
        *,
        created: float | None = None,
        replaces: str | None = None,
    ) -> Written:
        if replaces is None or replaces == session_id:
            with self.handoff.writing():
                return self.memory.create(session_id, fields, created=created, replaces=replaces)
        with self.handoff.holding(replaces):
            self.handoff.load(replaces)  # dropped everywhere, as by delete()
            with self.handoff.writing():
                return self.memory.create(session_id, fields, created=created, replaces=replaces)

    def delete(self, session_id: str) -> None:
        # A session not held here (a logout that loaded nothing, during a hand-over) is
        # taken in first: else its last holder keeps it, and a later miss fetches it back.
        # One on its way to a peer lands first (``holding`` waits), and comes back.
        with self.handoff.holding(session_id):
            self.handoff.load(session_id)
            with self.handoff.writing():
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
        if size > MAX_HANDOFF:
            raise ValueError("hand-off message too large")
    return b"".join(chunks)


@contextmanager
def _locked(path: Path, timeout: float) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` (created), waited for ``timeout`` seconds at
    most: whether it was had. The kernel drops it with a process that dies."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:  # (out of descriptors): not had
        log.warning("statescale: could not open %s: %s", path, exc)
        yield False
        return
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.005)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _parent_of(name: str) -> int | None:
    """The parent pid of the process a socket or file is named after (``<pid>`` or
    ``<pid>-<name>``), if it can be read."""
    try:
        with open(f"/proc/{int(name.partition('-')[0])}/stat", "rb") as stat:
            return int(stat.read().rpartition(b")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _remove_if_dead(path: Path) -> None:
    """A socket left by a process that crashed."""
    if _dead(path.stem):
        with contextlib.suppress(OSError):
            path.unlink()


def _dead(name: str) -> bool:
    """Whether the process a file is named after (``<pid>`` or ``<pid>-<name>``) is gone."""
    try:
        os.kill(int(name.partition("-")[0]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):
        return False
    return False


def stop_all() -> None:
    """Hand over every session this process holds (the gunicorn ``worker_exit`` hook)."""
    while _handoffs:
        _handoffs.pop().stop()
