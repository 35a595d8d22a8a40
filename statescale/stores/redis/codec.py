"""The one wire format of a session in Redis. Pure: values in, values out.

A session is one Redis hash. Its fields are the session's own (JSON texts, one per key)
beside two of the store's: the creation time (``CREATED_FIELD``) and a version
(``VERSION_FIELD``) that every write bumps. A write is one run of ``WRITE_SCRIPT``,
whose arguments :func:`write_args` lays out; :func:`decode` reads a ``HGETALL`` reply
back. Nothing else in statescale knows these shapes.

Field names hold no NUL (the session refuses such keys), so the store's own fields,
which start with one, can never collide with a session's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from ..base import CREATED_FIELD

VERSION_FIELD = "\x00v"
_CREATED = CREATED_FIELD.encode()
_VERSION = VERSION_FIELD.encode()

#: Mode of a write: change an existing record (nothing is written if it is gone) ...
UPDATE = "u"
#: ... or write a whole record afresh.
CREATE = "c"

# KEYS[1]: the session; KEYS[2] (optional): a session to delete in the same step.
# ARGV: mode, expiry in ms, the number of fields to delete, those fields, then
# field/value pairs to set. Returns the record's new version (>= 1), or 0 when an update
# finds no record: then it writes nothing. Fields go a thousand arguments a call (pairs
# stay whole): unpack() puts what it returns on Lua's stack, which holds 8,000 at most,
# and a larger unpack would fail after the deletes, leaving half a write.
# The last command reads the key: a write ends every client's tracking of the keys it
# changes (server-assisted client-side caching), and a read made by a script is tracked
# for the script's caller, so the writer goes on hearing of later changes to its copy.
WRITE_SCRIPT = """
local key = KEYS[1]
if ARGV[1] == 'u' then
  if redis.call('EXISTS', key) == 0 then return 0 end
else
  redis.call('DEL', key)
end
local n = tonumber(ARGV[3])
for i = 4, 3 + n, 1000 do
  redis.call('HDEL', key, unpack(ARGV, i, math.min(i + 999, 3 + n)))
end
for i = 4 + n, #ARGV, 1000 do
  redis.call('HSET', key, unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
local v = redis.call('HINCRBY', key, '\\0v', 1)
redis.call('PEXPIRE', key, ARGV[2])
if KEYS[2] then redis.call('DEL', KEYS[2]) end
redis.call('EXISTS', key)
return v
"""


def write_args(
    mode: str, ttl_ms: int, fields: Mapping[str, bytes], deleted: frozenset[str]
) -> list[str | int | bytes]:
    """``WRITE_SCRIPT``'s ARGV for setting ``fields`` and removing ``deleted``."""
    args: list[str | int | bytes] = [mode, ttl_ms, len(deleted), *deleted]
    for field, value in fields.items():
        args += (field, value)
    return args


def created_field(created: float) -> bytes:
    """The stored form of a creation time (``repr`` keeps every bit of the float)."""
    return repr(created).encode()


class Unreadable(ValueError):
    """A hash that is not a session record statescale wrote."""


class Decoded(NamedTuple):
    fields: dict[str, bytes]
    created: float
    version: int  # 0: written before versions, or by hand


def decode(raw: dict[bytes, bytes]) -> Decoded | None:
    """The record in a ``HGETALL`` reply (which it consumes); ``None`` when there is
    none (an empty reply, or a hash without a creation time: a partial record).
    Raises :class:`Unreadable` for a record it cannot read."""
    stamp = raw.pop(_CREATED, None)
    version = raw.pop(_VERSION, b"0")
    if stamp is None:
        return None
    try:
        return Decoded({k.decode(): v for k, v in raw.items()}, float(stamp), int(version))
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unreadable(str(exc)) from exc
