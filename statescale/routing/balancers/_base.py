"""What every balancer module gives the registry (:mod:`statescale.routing.balancers`):
its name, its ring, its configuration writer and how to run it. Pure."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ...exceptions import ConfigError
from ..backends import Backend, check
from ..ring import NodeRing

_COOKIE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")  # what every configuration takes as it is


@dataclass(frozen=True)
class Balancer:
    """One balancer statescale can route like.

    * ``node_key``: the name the balancer's ring knows a backend by (its address for
      nginx, its name for statescale and HAProxy);
    * ``make_ring``: the ring over those keys, weighted;
    * ``write_config``: a complete configuration, ``(backends, listen, cookie) -> text``;
    * ``config_name``: the file name that configuration is written to;
    * ``run``: the command that serves a written configuration in the foreground,
      ``(config path, listen, cookie) -> argv``;
    * for ``statescale lb-sync``: ``reloadable`` adjusts a configuration for reloads in
      place (``(text, config path) -> text``), ``check`` is the command that checks a
      written one, and ``reload`` reloads the balancer serving it (False if none runs,
      ``ConfigError`` if that failed);
    * ``usable``: of the backends given, those it can serve together.
    """

    name: str
    summary: str
    node_key: Callable[[Backend], str]
    make_ring: Callable[[Mapping[str, float]], NodeRing]
    write_config: Callable[[Sequence[Backend], str, str], str]
    config_name: str
    run: Callable[[Path, str, str], list[str]]
    reloadable: Callable[[str, Path], str] = lambda text, path: text
    reload: Callable[[Path], bool] | None = None
    check: Callable[[Path], list[str]] | None = None
    #: The backends this balancer can serve together, of those given in order (each
    #: left out is logged): what every ring and configuration is built over, so that a
    #: registry's followers agree whatever the registry holds.
    usable: Callable[[Sequence[Backend]], list[Backend]] = list

    def ring(self, backends: Sequence[Backend]) -> BackendRing:
        """This balancer's ring over ``backends``, answering with backend names."""
        return BackendRing(self, backends)

    def config(self, backends: Sequence[Backend], *, listen: str, cookie: str) -> str:
        """The configuration that routes ``cookie``'s sessions as :meth:`ring` does."""
        if not _COOKIE.match(cookie):
            raise ConfigError(
                f"a balancer routes by a cookie named with A-Z a-z 0-9 _ . - only, not {cookie!r}"
            )
        return self.write_config(self.usable(check(backends)), listen, cookie)

    def command(self, config: Path, *, listen: str, cookie: str) -> list[str]:
        """The command that serves ``config`` (written by :meth:`config` with the same
        ``listen`` and ``cookie``) in the foreground."""
        return self.run(config, listen, cookie)


class BackendRing:
    """A balancer's ring over backends: ``owner`` answers with a backend's name."""

    def __init__(self, balancer: Balancer, backends: Sequence[Backend]) -> None:
        self.balancer = balancer
        self.backends = balancer.usable(check(backends))
        self._name_of = {balancer.node_key(b): b.name for b in self.backends}
        self._key_of = {name: key for key, name in self._name_of.items()}
        self.ring = balancer.make_ring({balancer.node_key(b): b.weight for b in self.backends})

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.backends)

    def owner(self, session_id: str, down: Iterable[str] = ()) -> str:
        """The backend that owns ``session_id``, skipping the backends in ``down``
        (``LookupError`` when every one is down)."""
        keys_down = [self._key_of[name] for name in down]
        return self._name_of[self.ring.owner(session_id, keys_down)]

    def __repr__(self) -> str:
        return f"BackendRing({self.balancer.name!r}, {[b.spec for b in self.backends]})"


def serving_pid(pidfile: Path, program: str, config_file: Path) -> int | None:
    """The pid in ``pidfile``, if that process is ``program`` serving ``config_file``:
    a pid file left behind (a balancer stopped or crashed) may name a process that has
    nothing to do with it by now, and must not be signalled."""
    try:
        pid = int(pidfile.read_text().split()[0])
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError, IndexError):  # no pid file, or its process is gone
        return None
    return pid if program in argv and config_file.name in argv else None


def python_module(*args: str) -> list[str]:
    """``python -m ...`` with this interpreter."""
    return [sys.executable, "-m", *args]
