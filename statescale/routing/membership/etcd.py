"""The etcd registry, through etcd3gw (etcd's v3 JSON gateway; the ``etcd`` extra).

Each member is one key, ``PREFIX/members/NAME``, whose value is ``TOKEN SPEC``, attached
to a lease of its own: renewing is a lease keep-alive, a crashed member's key goes when
its lease runs out, and deregistering revokes the lease (a new master that has put the
same name since holds it on a lease of its own, which stays). A follower opens a watch
stream on the prefix, reads the members once the watch exists, and reads them again
after every event.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import re
import socket
import threading
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ...exceptions import ConfigError
from ..backends import Backend
from .base import Changed, NameTaken, RegistryUnavailable, Replaced, sort

log = logging.getLogger("statescale.registry")

DEFAULT_PREFIX = "/statescale/registry"
TIMEOUT = 2.0  # seconds per etcd call (and to open a watch)
IDLE = 30.0  # seconds a watch stream may stay silent before it is opened again
_CLAIM_TRIES = 5  # reads and transactions of one registration, at most


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _member(text: str) -> Backend | None:
    """The member ``text`` specifies; ``None`` for junk (which a registration replaces)."""
    try:
        return Backend.parse(text)
    except ConfigError:
        return None


class EtcdRegistry:
    """``etcd://HOST:PORT[/PREFIX]``, or ``etcd+https://HOST:PORT[/PREFIX][?ca=FILE]
    [&cert=FILE&key=FILE]`` for TLS, with a client certificate if etcd asks for one
    (etcd's client-certificate authentication: keep the registry writable by the fleet
    only, since whoever can write it can add a node that routers send users to)."""

    def __init__(self, url: str) -> None:
        try:
            import etcd3gw
            import requests
        except ImportError as exc:
            raise ConfigError(
                f"{url!r}: the etcd registry needs etcd3gw: pip install 'statescale[etcd]'"
            ) from exc
        parts = urlsplit(url)
        if not parts.hostname:
            raise ConfigError(f"{url!r}: give the etcd endpoint, etcd://HOST:2379[/PREFIX]")
        self.url = url
        protocol = "https" if parts.scheme.endswith("https") else "http"
        tls = {k: v[0] for k, v in parse_qs(parts.query).items()}
        unknown = set(tls) - {"ca", "cert", "key"}
        if unknown or ("cert" in tls) != ("key" in tls):
            raise ConfigError(
                f"{url!r}: TLS options are ?ca=FILE and ?cert=FILE&key=FILE (a client "
                "certificate and its key, together)"
            )
        self._client: Any = etcd3gw.Etcd3Client(
            host=parts.hostname,
            port=parts.port or 2379,
            protocol=protocol,
            timeout=TIMEOUT,
            ca_cert=tls.get("ca"),
            cert_cert=tls.get("cert"),
            cert_key=tls.get("key"),
        )
        self._errors: tuple[type[Exception], ...] = (
            requests.RequestException,
            etcd3gw.exceptions.Etcd3Exception,
            OSError,
            ValueError,
            KeyError,
        )
        self.prefix = (parts.path.rstrip("/") or DEFAULT_PREFIX) + "/members/"
        self._leases: dict[str, tuple[Any, str]] = {}  # name -> (lease, value put)
        self._lock = threading.Lock()

    def members(self) -> list[Backend]:
        try:
            values = self._client.get_prefix(self.prefix)
        except self._errors as exc:
            raise RegistryUnavailable(f"the etcd registry failed: {_why(exc)}") from exc
        members = []
        for value, _ in values:
            try:  # one bad entry is skipped: it must not stop every follower for good
                spec = value.decode().partition(" ")[2]
                members.append(Backend.parse(spec))
            except (ConfigError, ValueError) as exc:
                log.warning("statescale: the registry holds a bad entry %r: %s", value, exc)
        return sort(members)

    def register(self, backend: Backend, *, ttl: float, token: str, renewal: bool = False) -> None:
        value = f"{token} {backend.spec}"
        with self._lock:
            try:
                held = self._leases.get(backend.name)
                if held is not None and held[1] == value and held[0].refresh() > 0:
                    # Renewed, if the entry is still ours: another registration of the
                    # name (a USR2 upgrade's new master) may have taken the key onto its
                    # lease, which has lapsed since (an upgrade rolled back).
                    self._claim(backend, value, held[0], renewal=renewal)
                    return
                lease = self._client.lease(ttl=max(2, math.ceil(ttl)))
                try:
                    self._claim(backend, value, lease, renewal=renewal)
                except RegistryUnavailable:
                    with contextlib.suppress(RegistryUnavailable):  # (it lapses anyway)
                        self._revoke(lease)
                    raise
            except self._errors as exc:
                raise RegistryUnavailable(f"the etcd registry failed: {_why(exc)}") from exc
            self._leases[backend.name] = (lease, value)
            if held is not None:  # a changed entry: the old lease goes, if it is still there
                with contextlib.suppress(RegistryUnavailable):  # (lapsed: gone already)
                    self._revoke(held[0])

    def _claim(self, backend: Backend, value: str, lease: Any, *, renewal: bool) -> None:
        """Put ``value`` under ``backend``'s name on ``lease``, unless a live instance at
        another address holds the name (as the Redis registry refuses it): one
        transaction on what was read, so two instances racing for a name cannot both
        win. Over the same address (a ``USR2`` upgrade's new master), or junk, it goes."""
        key = self.prefix + backend.name
        for _ in range(_CLAIM_TRIES):
            stored = self._client.get(key)
            if stored == [value.encode()]:
                return  # ours already
            compare: dict[str, object]
            if stored:
                other = stored[0].decode(errors="replace").partition(" ")[2]
                member = _member(other)
                if member is not None and member.address != backend.address:
                    raise NameTaken(backend.name)
                if renewal and member is not None and member != backend:
                    raise Replaced(backend.name)  # a successor's, another weight: it stands
                compare = {"target": "VALUE", "value": base64.b64encode(stored[0]).decode()}
            else:
                compare = {"target": "CREATE", "create_revision": 0}
            put = {"key": _b64(key), "value": _b64(value), "lease": lease.id}
            answer = self._client.transaction(
                {
                    "compare": [{"key": _b64(key), "result": "EQUAL", **compare}],
                    "success": [{"request_put": put}],
                    "failure": [],
                }
            )
            if answer.get("succeeded"):
                return
        raise RegistryUnavailable(f"the name {backend.name!r} kept changing under this claim")

    def deregister(self, name: str, *, token: str) -> None:
        with self._lock:
            held = self._leases.get(name)
            if held is not None and held[1].startswith(f"{token} "):
                del self._leases[name]
                self._revoke(held[0])

    def _revoke(self, lease: Any) -> None:
        try:
            lease.revoke()
        except self._errors as exc:
            raise RegistryUnavailable(f"the etcd registry failed: {_why(exc)}") from exc

    def watch(self, changed: Changed, stop: threading.Event) -> None:
        members: list[Backend] | None = None
        while not stop.is_set():  # each stream lasts until it has been idle IDLE seconds
            members = self._watch_stream(changed, stop, members)

    def _watch_stream(
        self, changed: Changed, stop: threading.Event, members: list[Backend] | None
    ) -> list[Backend] | None:
        """One watch stream: the members once it exists, again after every event.
        Returns after ``IDLE`` seconds without a word from etcd, so that a connection
        that died silently (a half-open one) is replaced, and members read again."""
        from urllib3.exceptions import ReadTimeoutError

        end = self.prefix[:-1] + chr(ord(self.prefix[-1]) + 1)
        request = {"create_request": {"key": _b64(self.prefix), "range_end": _b64(end)}}
        try:
            stream = self._client.session.post(
                self._client.get_url("/watch"), json=request, stream=True, timeout=(TIMEOUT, IDLE)
            )
        except self._errors as exc:
            raise RegistryUnavailable(f"the etcd registry's watch failed: {_why(exc)}") from exc
        threading.Thread(target=_close_on, args=(stop, stream), daemon=True).start()
        try:
            for line in stream.iter_lines():
                if stop.is_set():
                    return members
                if not line.strip():
                    continue
                result = json.loads(line).get("result", {})
                if result.get("canceled"):
                    raise RegistryUnavailable(f"etcd cancelled the watch: {result}")
                if result.get("created") or result.get("events"):
                    fresh = self.members()
                    if fresh != members:
                        members = fresh
                        changed(members)
        except self._errors as exc:
            if stop.is_set() or (exc.args and isinstance(exc.args[0], ReadTimeoutError)):
                return members  # idle, or stopped: open another, or end
            raise RegistryUnavailable(f"the etcd registry's watch failed: {_why(exc)}") from exc
        finally:
            stream.close()
        if not stop.is_set():
            raise RegistryUnavailable("the etcd watch stream ended")
        return members

    def close(self) -> None:
        self._client.session.close()


def _why(exc: BaseException) -> str:
    """What went wrong, in words: etcd3gw's own errors carry none, the error beneath
    them does (a refused connection, say)."""
    found: BaseException | None = exc
    while found is not None and not str(found):
        found = found.__cause__ or found.__context__
    text = str(found) if found is not None else ""
    refused = re.search(r"\[Errno \d+\] [^'\")]+", text)  # the root cause, if it is one
    return refused.group(0) if refused else (text or type(exc).__name__)


def _close_on(stop: threading.Event, stream: Any) -> None:
    """End a blocking watch read once ``stop`` is set: shut its socket down (closing
    the response from another thread would not wake the reader)."""
    while not stop.wait(1.0):
        if stream.raw is None or stream.raw.closed:
            return
    with (
        contextlib.suppress(OSError, ValueError, AttributeError),
        socket.fromfd(stream.raw.fileno(), socket.AF_INET, socket.SOCK_STREAM) as sock,
    ):
        sock.shutdown(socket.SHUT_RDWR)
