"""The URL that picks a registry: :func:`open_registry`."""

from __future__ import annotations

from urllib.parse import urlsplit

from ...exceptions import ConfigError
from .base import Registry

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
    if scheme in ("redis", "rediss", "unix") or scheme.startswith(("redis+", "rediss+")):
        from .redis import RedisRegistry

        return RedisRegistry(url)
    if scheme in ("etcd", "etcd+http", "etcd+https"):
        from .etcd import EtcdRegistry

        return EtcdRegistry(url)
    if scheme == "file":
        from .file import FileRegistry

        return FileRegistry(url)
    from ...stores.redis.client import redacted  # (it may hold a password)

    raise ConfigError(f"STATESCALE_REGISTRY={redacted(url)!r}: unknown scheme; use {SCHEMES}")
