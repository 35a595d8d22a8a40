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
# A hostname, an IPv4 address or a bracketed IPv6 one: what a balancer's configuration
# can take as it is (a registry entry is written by any instance; a space, ';', '{' or
# a newline in it would add directives to nginx's or HAProxy's configuration).
_HOST = re.compile(r"(?:[A-Za-z0-9_.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])\Z")
_UNIX = re.compile(r"unix:/[^\s\x00]{1,200}\Z")
MAX_WEIGHT = 256  # HAProxy's most; more only slows the rings down


@dataclass(frozen=True)
class Backend:
    """One instance: a name (what the app calls itself), an address, a weight."""

    name: str
    host: str
    port: int
    weight: int = 1

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(f"a backend's name is 1-64 of A-Z a-z 0-9 _ . -, not {self.name!r}")
        if self.host.startswith("unix:"):
            if not _UNIX.match(self.host):
                raise ConfigError(f"{self.host!r} is not a Unix socket's unix:/PATH")
        elif not _HOST.match(self.host):
            raise ConfigError(
                f"{self.host!r} is not a hostname, an IPv4 address or a [bracketed] IPv6 one"
            )
        elif not 0 < self.port < 65536:
            raise ConfigError(f"{self.name}: the port must be between 1 and 65535")
        if not 1 <= self.weight <= MAX_WEIGHT:
            raise ConfigError(f"{self.name}: the weight must be from 1 to {MAX_WEIGHT}")

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
        if weight and not _NUMBER.match(weight):
            raise ConfigError(f"{spec!r}: the weight after * must be from 1 to {MAX_WEIGHT}")
        if address.startswith("unix:"):
            if not unix:
                raise ConfigError(f"{spec!r}: a backend is NAME=HOST:PORT (no Unix sockets here)")
            if not sep or not _NAME.match(name) or not address.startswith("unix:/"):
                raise ConfigError(f"{spec!r}: a Unix-socket backend is NAME=unix:/PATH")
            host, port = address, "0"
        else:
            host, _, port = address.rpartition(":")
            if not sep or not _NAME.match(name) or not host or not _NUMBER.match(port):
                raise ConfigError(
                    f"{spec!r}: a backend is NAME=HOST:PORT (or NAME=HOST:PORT*WEIGHT)"
                )
        try:  # the host, the port's and the weight's ranges: checked by the Backend
            return cls(name, host, int(port), int(weight or 1))
        except ConfigError as exc:
            raise ConfigError(f"{spec!r}: {exc}") from None


def check(backends: Sequence[Backend]) -> list[Backend]:
    """``backends`` as a list, if it is a membership: at least one, names distinct."""
    if not backends:
        raise ConfigError("give at least one backend")
    names = [b.name for b in backends]
    if len(set(names)) != len(names):
        raise ConfigError(f"backend names must be distinct: {names}")
    addresses = [b.address for b in backends]
    if len(set(addresses)) != len(addresses):  # nginx's ring is keyed by address
        raise ConfigError(f"backend addresses must be distinct: {addresses}")
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
