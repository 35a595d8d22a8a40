"""The Redis registry: the fleet's members in one hash, their changes announced on one
channel. For fleets that run Redis for their sessions already.

Each field is a member's name; its value is ``<expires-ms> <token> <spec>``, the expiry
in Redis's own clock (``TIME``), so the instances' clocks do not matter. Scripts make
each call atomic:

* registering (or renewing) sets the expiry; it publishes only when the member is new,
  moved, or had expired: a renewal costs Redis one script and nobody else anything. A
  live entry at the same address is taken over (the new master of a ``USR2`` upgrade);
  one at another address is refused (two instances cannot share a name);
* deregistering removes the entry if its token is the caller's, and publishes;
* reading drops the entries that have expired (publishing if it dropped any) and
  returns the rest with Redis's time.

A follower subscribes to the channel, then reads; it reads again when a notice comes
(or its subscription is made again, after a reconnection), when the earliest expiry it
knows of passes (a member that has stopped renewing drops out then, however many
followers there are: the first to read publishes), and at least every ``RESYNC`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from ...exceptions import ConfigError
from ..backends import Backend
from .base import Changed, NameTaken, RegistryUnavailable, Replaced, sort

log = logging.getLogger("statescale.registry")

DEFAULT_PREFIX = "statescale:registry"
TIMEOUT = 2.0  # seconds per Redis call
_MARGIN = 0.05  # seconds after an expiry before reading again
#: Seconds between reads when nothing is announced: a notice lost all the same (a
#: connection that broke and came back unnoticed) is read within this.
RESYNC = 5.0
_DIGITS = 15  # an expiry in ms with more is no registration's (and Lua's numbers lose it)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_REGISTER = (
    _NOW
    + """
local function address(spec) return (string.gsub(spec, '%*%d+$', '')) end
local old = redis.call('HGET', KEYS[1], ARGV[1])
local fresh = 1
if old then
  local expires, token, spec = string.match(old, '^(%d+) (%S+) (.*)$')
  if expires and tonumber(expires) > now then  -- (junk there is no registration)
    if spec == ARGV[3] then
      fresh = 0
    elseif token ~= ARGV[2] then
      if address(spec) ~= address(ARGV[3]) then return -1 end  -- another instance's
      if ARGV[5] == '1' then return -2 end  -- a successor's, weight changed: it stands
    end
  end
end
local value = string.format('%.0f', now + tonumber(ARGV[4])) .. ' ' .. ARGV[2] .. ' ' .. ARGV[3]
redis.call('HSET', KEYS[1], ARGV[1], value)
if fresh == 1 then redis.call('PUBLISH', KEYS[2], ARGV[1]) end
return fresh
"""
)

_DEREGISTER = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
local _, token = string.match(old, '^(%d+) (%S+) ')
if token ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('PUBLISH', KEYS[2], ARGV[1])
return 1
"""

_READ = (
    _NOW
    + """
local all = redis.call('HGETALL', KEYS[1])
local live = {string.format('%.0f', now)}
local dropped = 0
for i = 1, #all, 2 do
  local expires = tonumber(string.match(all[i + 1], '^(%d+) '))
  if expires and expires > now then
    table.insert(live, all[i + 1])
  else
    redis.call('HDEL', KEYS[1], all[i])
    dropped = 1
  end
end
if dropped == 1 then redis.call('PUBLISH', KEYS[2], '-') end
return live
"""
)


class RedisRegistry:
    """``redis://HOST:PORT[/DB][?prefix=NAME]`` (or ``rediss://``, ``redis+sentinel://``)."""

    def __init__(self, url: str) -> None:
        import redis

        from ...stores.redis.client import client_from_url, redacted

        parts = urlsplit(url)
        query = parse_qs(parts.query, keep_blank_values=True)
        prefix = query.pop("prefix", [""])[0] or DEFAULT_PREFIX
        self.url = redacted(url)  # (what logs and errors show)
        if parts.scheme.endswith("+cluster"):
            raise ConfigError(f"{self.url!r}: use one Redis server (or Sentinel) for the registry")
        rest = urlencode(query, doseq=True)  # the rest as it came: encoded again
        self._client: Any = client_from_url(
            urlunsplit(parts._replace(query=rest)), timeout=TIMEOUT, retries=1
        )
        self._errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)
        # One hash slot for both, in case the server is ever a Cluster's.
        self.hash = f"{{{prefix}}}:members"
        self.channel = f"{{{prefix}}}:changes"
        self._register = self._client.register_script(_REGISTER)
        self._deregister = self._client.register_script(_DEREGISTER)
        self._read = self._client.register_script(_READ)

    def _call(self, script: Any, *args: object) -> Any:
        try:
            return script(keys=[self.hash, self.channel], args=list(args))
        except self._errors as exc:
            raise RegistryUnavailable(f"the Redis registry failed: {exc}") from exc

    def _live(self) -> tuple[list[Backend], float]:
        """The live members, and seconds until the first of them expires."""
        now, *entries = self._call(self._read)
        members, first = [], float("inf")
        for entry in entries:
            try:  # written by something else: skip it, say so (it must not stop a follower)
                expires, _, spec = entry.decode().split(" ", 2)
                if not (expires.isdigit() and len(expires) <= _DIGITS):
                    raise ValueError(f"an expiry of {len(expires)} characters")
                member = Backend.parse(spec)
            except (ConfigError, ValueError) as exc:
                log.warning("statescale: the registry holds a bad entry %.200r: %s", entry, exc)
                continue
            members.append(member)
            first = min(first, (int(expires) - int(now)) / 1000)
        return sort(members), first

    def members(self) -> list[Backend]:
        return self._live()[0]

    def register(self, backend: Backend, *, ttl: float, token: str, renewal: bool = False) -> None:
        # A live entry of the same name and address is taken over (a USR2 successor);
        # one elsewhere is another instance's: two cannot share a name.
        taken = self._call(
            self._register, backend.name, token, backend.spec, int(ttl * 1000), int(renewal)
        )
        if taken == -1:
            raise NameTaken(backend.name)
        if taken == -2:
            raise Replaced(backend.name)

    def deregister(self, name: str, *, token: str) -> None:
        self._call(self._deregister, name, token)

    def watch(self, changed: Changed, stop: threading.Event) -> None:
        # Subscription confirmations are notices too: redis-py reconnects and subscribes
        # again by itself, and what was announced in between is read then.
        pubsub = self._client.pubsub(ignore_subscribe_messages=False)
        try:
            pubsub.subscribe(self.channel)
            members, first = self._live()  # after subscribing: no change falls between
            changed(members)
            wake = time.monotonic() + min(first, RESYNC) + _MARGIN
            while not stop.is_set():
                wait = min(1.0, max(0.0, wake - time.monotonic()))
                notice = pubsub.get_message(timeout=wait)
                if notice is None and time.monotonic() < wake:
                    continue
                while pubsub.get_message(timeout=0) is not None:
                    pass  # several notices at once: one read answers them all
                now, (fresh, first) = time.monotonic(), self._live()
                wake = now + min(first, RESYNC) + _MARGIN
                if fresh != members:
                    members = fresh
                    changed(members)
        except self._errors as exc:
            raise RegistryUnavailable(f"the Redis registry's watch failed: {exc}") from exc
        finally:
            pubsub.close()

    def close(self) -> None:
        self._client.close()
