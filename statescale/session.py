"""The session object: a dict-like mapping that records what the request changed. Pure.

The middleware creates one per request and hands it to the application. Nothing is read
from the store until the application first looks inside, so a request that never touches
the session costs no round trip. At the end of the request the middleware asks
:meth:`Session.changes` for the keys that were set and deleted, and writes only those:
two parallel requests of one session that change different keys both survive.

Values are stored as JSON, one field per key, never pickled. A value that JSON cannot
represent raises :class:`SerializationError` naming the key, at the line that set it.
A ``dict`` or ``list`` value that the application read and changed in place is noticed
at the end of the request (its JSON differs from what was loaded) and saved too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any, NamedTuple

from .exceptions import SerializationError, SessionError, SessionTooLarge

log = logging.getLogger("statescale")

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_decode = json.JSONDecoder().decode  # stored values are UTF-8, as encode_value writes them
_MUTABLE = (dict, list)


def encode_value(key: str, value: object) -> bytes:
    """The stored form of one session value; ``SerializationError`` names ``key``."""
    try:
        return _encoder.encode(value).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise SerializationError(key, value, str(exc)) from exc


class Record(NamedTuple):
    """A session as a store holds it: encoded fields and the creation time (epoch s)."""

    fields: Mapping[str, bytes]
    created: float


class Written(NamedTuple):
    """What a store reports of a record it created."""

    created: float
    version: int = 0  # 0: the store keeps no versions


class Changes(NamedTuple):
    """What one request changed: fields to write and fields to remove."""

    set: Mapping[str, bytes]
    deleted: frozenset[str]

    def __bool__(self) -> bool:
        return bool(self.set or self.deleted)


Loader = Callable[[str], "Record | None"]


class Plan(NamedTuple):
    """What the middleware must do at the end of a request (all ``None``: nothing)."""

    create: Mapping[str, bytes] | None = None  # write a whole record under a new ID
    update: Changes | None = None  # write these changes to the existing record
    session_id: str | None = None  # ... whose ID this is
    drop: str | None = None  # delete this ID's record (logout, login, corrupt data)
    cookie: str | None = None  # "set" the cookie for the (new) ID, or "clear" it


_NOTHING = Plan()


class Session(MutableMapping[str, Any]):
    """One request's view of a session.

    ``id`` is the ID of the stored record this session is bound to, or ``None`` while
    the session is new (the middleware mints an ID when data is first written). An ID
    presented by a cookie is adopted only if the store knows it. ``new`` is true when no
    stored record stands behind the session. Reading either loads the session.
    """

    def __init__(
        self,
        session_id: str | None,
        loader: Loader,
        *,
        max_size: int,
        stale: bool = False,
    ) -> None:
        self._presented = session_id
        self._loader = loader
        self.max_size = max_size
        self.stale = stale  # the cookie was signed by an older key
        self.accessed = False
        self.created: float | None = None
        self._id: str | None = None
        self._loaded = session_id is None
        self._data: dict[str, Any] = {}
        self._raw: dict[str, bytes] = {}
        self._size = 0
        self._set: set[str] = set()
        self._deleted: set[str] = set()
        self._watch: set[str] = set()
        self._drop: str | None = None
        self._rotate = False
        self._closed = False
        self._abandoned = False  # nothing of this request is to be saved

    # -- loading ---------------------------------------------------------------------
    def _ensure(self) -> None:
        self.accessed = True
        if self._loaded:
            return
        record = self._loader(self._presented)  # type: ignore[arg-type]
        self._loaded = True
        if record is None:
            return
        try:
            data = {key: _decode(raw.decode("utf-8")) for key, raw in record.fields.items()}
        except (ValueError, UnicodeDecodeError, RecursionError):  # (nested too deep here)
            log.warning("statescale: dropped a session whose stored data is not valid JSON")
            self._drop = self._presented
            return
        self._id = self._presented
        self.created = record.created
        self._data = data
        self._raw = dict(record.fields)
        self._size = sum(len(k.encode()) + len(v) for k, v in self._raw.items())

    @property
    def id(self) -> str | None:
        self._ensure()
        return self._id

    @property
    def new(self) -> bool:
        self._ensure()
        return self._id is None

    @property
    def modified(self) -> bool:
        """Changed by ``[]=``, ``del``, ``regenerate`` or ``invalidate``.

        A ``dict`` or ``list`` value changed in place is found at the end of the request
        whatever this says; setting ``modified = True`` is accepted for Flask habits.
        """
        return bool(self._set or self._deleted or self._drop or self._rotate)

    @modified.setter
    def modified(self, value: bool) -> None:
        if value:
            self._writable()
            self._ensure()
            self._watch.update(self._data)

    permanent = True  # Flask's flag; lifetime is the store's idle and absolute timeouts

    # -- the mapping -----------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        self._ensure()
        value = self._data[key]
        if isinstance(value, _MUTABLE):
            self._watch.add(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str) or "\x00" in key:
            # NUL: the stores' own fields start with it, and changes are NUL-separated
            raise SessionError(f"session keys must be str without NUL characters, not {key!r}")
        self._writable()
        raw = encode_value(key, value)
        self._ensure()
        old = self._raw.get(key)
        width = len(key.encode())  # bytes, as stored
        size = self._size + width + len(raw) - (0 if old is None else width + len(old))
        if size > self.max_size:
            raise SessionTooLarge(key, size, self.max_size)
        self._data[key] = value
        self._raw[key] = raw
        self._size = size
        self._set.add(key)
        self._deleted.discard(key)
        if isinstance(value, _MUTABLE):
            self._watch.add(key)

    def __delitem__(self, key: str) -> None:
        self._writable()
        self._ensure()
        del self._data[key]
        raw = self._raw.pop(key)
        self._size -= len(key.encode()) + len(raw)
        self._set.discard(key)
        self._watch.discard(key)
        self._deleted.add(key)

    def __iter__(self) -> Iterator[str]:
        self._ensure()
        return iter(self._data)

    def __len__(self) -> int:
        self._ensure()
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        self._ensure()
        return key in self._data

    def clear(self) -> None:
        """Empty the session as :meth:`invalidate` does: the record is deleted, and
        what is written next starts a session under a fresh ID (Flask's login idiom,
        ``session.clear()`` then ``session["user_id"] = ...``, never keeps an ID that
        someone else may have planted)."""
        self.invalidate()

    def copy(self) -> dict[str, Any]:
        """A plain ``dict`` of the session's values as they are now, values changed in
        place included (changing it changes nothing)."""
        self._ensure()
        return {k: _decode(encode_value(k, v).decode("utf-8")) for k, v in self._data.items()}

    def __repr__(self) -> str:
        state = "unloaded" if not self._loaded else repr(self._data)
        return f"<Session {self._id or 'new'} {state}>"

    # -- life cycle ------------------------------------------------------------------
    def regenerate(self) -> None:
        """Move the data to a fresh ID and delete the old record (call it on login)."""
        self._writable()
        self._ensure()
        self._rotate = True
        if self._id is not None:
            self._drop = self._id
            self._id = None

    def invalidate(self) -> None:
        """Delete the stored record and expire the cookie (logout). The session is then
        empty and new; writing to it again starts another session under a fresh ID."""
        self._writable()
        self.accessed = True
        if self._presented is not None:
            self._drop = self._presented
        self._loaded = True
        self._id = self.created = None
        self._data.clear()
        self._raw.clear()
        self._size = 0
        self._set.clear()
        self._deleted.clear()
        self._watch.clear()

    def _writable(self) -> None:
        if self._closed:
            raise SessionError(
                "the session was saved when the response started; a change made after "
                "that (in a streamed body, a teardown) would be lost, so it is refused"
            )

    # -- end of request --------------------------------------------------------------
    def close(self) -> None:
        """The middleware saved the session (the response started): later changes are
        refused rather than lost (a value changed in place after this is not seen:
        change values before the response starts)."""
        self._closed = True

    def abandon(self) -> None:
        """Save nothing of this request (its response is an error: see
        ``statescale.flask``), and refuse changes from now on."""
        self._abandoned = self._closed = True

    def changes(self) -> Changes:
        """The fields to write and remove, including values changed in place (also
        those set in this request: ``setdefault("cart", []).append(x)``). Raises
        :class:`SerializationError` or :class:`SessionTooLarge` for what cannot be
        stored; asking again gives the same answer."""
        if self._abandoned:
            return Changes({}, frozenset())
        for key in self._watch:
            if key not in self._data:
                continue
            raw = encode_value(key, self._data[key])
            if raw != self._raw[key]:
                self._size += len(raw) - len(self._raw[key])
                self._raw[key] = raw
                self._set.add(key)
        written = {key: self._raw[key] for key in self._set}
        if self._size > self.max_size:
            raise SessionTooLarge(next(iter(written), ""), self._size, self.max_size)
        return Changes(written, frozenset(self._deleted))

    def plan(self) -> Plan:
        """What to do with the store and the cookie now the request is done."""
        if not self._loaded or self._abandoned:
            return _NOTHING
        changes = self.changes()
        if self._id is not None:  # a live record, same ID
            cookie = "set" if self.stale else None
            return Plan(update=changes or None, session_id=self._id, cookie=cookie)
        if self._data:
            return Plan(create=dict(self._raw), drop=self._drop, cookie="set")
        if self._drop is not None or self._presented is not None:
            return Plan(drop=self._drop, cookie="clear")
        return _NOTHING

    def bind(self, session_id: str, created: float) -> None:
        """Record that the middleware stored this session under ``session_id``."""
        self._id = self._presented = session_id
        self.created = created
        self._set.clear()
        self._deleted.clear()
        self._drop = None
        self._rotate = False
