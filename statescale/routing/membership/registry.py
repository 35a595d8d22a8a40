"""What every registry does, the URL that picks one (:func:`open_registry`), and the
static file registry.

A registry holds the fleet's live members, each a :class:`~..backends.Backend` (a
name, the address others reach it at, a weight):

* an instance :meth:`~Registry.register`\\ s itself and renews that with the same call
  well within ``ttl`` seconds; one that stops renewing (a crash) drops out when the TTL
  runs out;
* :meth:`~Registry.deregister` removes it at once, but only its own entry: ``token``
  tells one registration from the next, so the old master of a ``USR2`` upgrade, stopping,
  does not remove the name the new master has just registered;
* :meth:`~Registry.watch` blocks, calling ``changed(members)`` with the membership
  first and again after each change, woken by the registry's own notices (a Redis
  channel, an etcd watch), not by a polling loop.

Members come sorted by name, so every follower builds the same ring.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from ...exceptions import ConfigError, StateScaleError
from ..backends import Backend, parse_backends_text

log = logging.getLogger("statescale.registry")

Changed = Callable[[list[Backend]], None]


class RegistryUnavailable(StateScaleError):
    """The registry could not be reached or refused a call; the caller retries."""


class Registry(Protocol):
    """A membership registry (Redis, etcd or a static file)."""

    url: str

    def members(self) -> list[Backend]:
        """The live members, sorted by name."""

    def register(self, backend: Backend, *, ttl: float, token: str) -> None:
        """Add ``backend`` for ``ttl`` seconds, or renew it (the same call)."""

    def deregister(self, name: str, *, token: str) -> None:
        """Remove ``name``, if the entry is still the one ``token`` registered."""

    def watch(self, changed: Changed, stop: threading.Event) -> None:
        """Call ``changed`` with the members, then after every change, until ``stop``
        is set (within about a second) or the registry fails (:class:`RegistryUnavailable`)."""

    def close(self) -> None: ...


def sort(members: Sequence[Backend]) -> list[Backend]:
    return sorted(members, key=lambda b: b.name)


SCHEMES = "redis://, rediss://, redis+sentinel://, etcd://, file://"


def open_registry(url: str) -> Registry:
    """The registry at ``url``:

    * ``redis://HOST:PORT[/DB][?prefix=NAME]`` (also ``rediss://`` and
      ``redis+sentinel://``, as for the store): members in one hash, changes announced
      on one channel; ``prefix`` (default ``statescale:registry``) keeps fleets apart;
    * ``etcd://HOST:PORT[/PREFIX]`` (``etcd+https://`` for TLS): one key per member
      under ``PREFIX`` (default ``/statescale/registry``), each on a lease;
    * ``file:///PATH``: a static backends file (``NAME=HOST:PORT[*WEIGHT]`` a line),
      re-read when it changes; registering is left to whoever writes it.
    """
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss", "redis+sentinel", "redis+cluster", "unix"):
        from .redis import RedisRegistry

        return RedisRegistry(url)
    if scheme in ("etcd", "etcd+http", "etcd+https"):
        from .etcd import EtcdRegistry

        return EtcdRegistry(url)
    if scheme == "file":
        return FileRegistry(url)
    raise ConfigError(f"STATESCALE_REGISTRY={url!r}: unknown scheme; use {SCHEMES}")


class FileRegistry:
    """A backends file that an operator (or a configuration tool) keeps. A file has no
    watch of its own without inotify: :meth:`watch` looks at its size and time twice a
    second, which costs a ``stat``."""

    INTERVAL = 0.5

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        self.path = Path(parts.path)
        if parts.netloc not in ("", "localhost") or not self.path.is_absolute():
            raise ConfigError(f"{url!r}: give an absolute path, file:///path/to/backends")

    def members(self) -> list[Backend]:
        try:
            return sort(parse_backends_text(self.path.read_text()))
        except OSError as exc:
            raise RegistryUnavailable(f"cannot read {self.path}: {exc}") from exc
        except ConfigError as exc:
            raise RegistryUnavailable(f"{self.path}: {exc}") from exc

    def register(self, backend: Backend, *, ttl: float, token: str) -> None:
        listed = {b.name: b for b in self.members()}.get(backend.name)
        if listed != backend:
            log.warning(
                "statescale: %s is a static registry and lists %s, not %s; edit the file",
                self.path,
                listed.spec if listed else "no such node",
                backend.spec,
            )

    def deregister(self, name: str, *, token: str) -> None:
        """Nothing: the file is the operator's."""

    def watch(self, changed: Changed, stop: threading.Event) -> None:
        seen: tuple[float, int] | None = None
        while not stop.is_set():
            try:
                info = self.path.stat()
            except OSError as exc:
                raise RegistryUnavailable(f"cannot read {self.path}: {exc}") from exc
            if (info.st_mtime, info.st_size) != seen:
                seen = (info.st_mtime, info.st_size)
                changed(self.members())
            stop.wait(self.INTERVAL)

    def close(self) -> None:
        pass
