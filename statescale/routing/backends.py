"""The fleet's members as routers see them: :class:`Backend`, and the one parser of
``NAME=HOST:PORT[*WEIGHT]`` specs and backends files. Pure."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..exceptions import ConfigError

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_NUMBER = re.compile(r"[0-9]{1,5}\Z")  # ASCII digits only: str.isdigit() takes "²" too


@dataclass(frozen=True)
class Backend:
    """One instance: a name (what the app calls itself), an address, a weight."""

    name: str
    host: str
    port: int
    weight: int = 1

    @property
    def address(self) -> str:
        return self.host if self.unix else f"{self.host}:{self.port}"

    @property
    def unix(self) -> str | None:
        """The socket's path for a ``unix:/path`` backend (one machine only: the
        statescale router inside a gunicorn master), else ``None``."""
        return self.host[len("unix:") :] if self.host.startswith("unix:") else None

    @property
    def spec(self) -> str:
        """``NAME=HOST:PORT[*WEIGHT]``, as :meth:`parse` takes it."""
        return f"{self.name}={self.address}" + ("" if self.weight == 1 else f"*{self.weight}")

    @classmethod
    def parse(cls, spec: str, *, unix: bool = False) -> Backend:
        """``NAME=HOST:PORT`` or ``NAME=HOST:PORT*WEIGHT``; with ``unix``, also
        ``NAME=unix:/path`` (the statescale router's command line only: what the gunicorn
        hooks give the router inside a master; no balancer, node or admin call takes it)."""
        name, sep, rest = spec.strip().partition("=")
        address, _, weight = rest.partition("*")
        if weight and (not _NUMBER.match(weight) or int(weight) < 1):
            raise ConfigError(f"{spec!r}: the weight after * must be a whole number >= 1")
        if address.startswith("unix:"):
            if not unix:
                raise ConfigError(f"{spec!r}: a backend is NAME=HOST:PORT (no Unix sockets here)")
            if not sep or not _NAME.match(name) or not address.startswith("unix:/"):
                raise ConfigError(f"{spec!r}: a Unix-socket backend is NAME=unix:/PATH")
            return cls(name, address, 0, int(weight or 1))
        host, _, port = address.rpartition(":")
        if not sep or not _NAME.match(name) or not host or not _NUMBER.match(port):
            raise ConfigError(f"{spec!r}: a backend is NAME=HOST:PORT (or NAME=HOST:PORT*WEIGHT)")
        if not 0 < int(port) < 65536:
            raise ConfigError(f"{spec!r}: the port must be between 1 and 65535")
        return cls(name, host, int(port), int(weight or 1))


def check(backends: Sequence[Backend]) -> list[Backend]:
    """``backends`` as a list, if it is a membership: at least one, names distinct."""
    if not backends:
        raise ConfigError("give at least one backend")
    names = [b.name for b in backends]
    if len(set(names)) != len(names):
        raise ConfigError(f"backend names must be distinct: {names}")
    return list(backends)


def parse_backends(specs: Iterable[str]) -> list[Backend]:
    """A membership from specs (``NAME=HOST:PORT[*WEIGHT]`` each); blank ones skipped."""
    return check([Backend.parse(spec) for spec in specs if spec.strip()])


def parse_backends_text(text: str) -> list[Backend]:
    """A backends file's membership: one spec a line; blank lines and ``#`` comments
    are skipped."""
    lines = (line.partition("#")[0] for line in text.splitlines())
    return parse_backends(lines)


def read_backends_file(path: Path) -> list[Backend]:
    """The membership in the backends file at ``path`` (see :func:`parse_backends_text`)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the backends file {path}: {exc}") from exc
    return parse_backends_text(text)


def backends_text(backends: Sequence[Backend]) -> str:
    """The backends file for ``backends`` (what :func:`parse_backends_text` reads)."""
    return "".join(f"{b.spec}\n" for b in check(backends))
