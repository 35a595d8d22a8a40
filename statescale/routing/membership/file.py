"""The static file registry: a backends file that an operator (or a configuration
tool) keeps, followed by looking at it."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from urllib.parse import urlsplit

from ...exceptions import ConfigError
from ..backends import Backend, parse_backends_text
from .base import Changed, RegistryUnavailable, sort

log = logging.getLogger("statescale.registry")


class FileRegistry:
    """A backends file that an operator (or a configuration tool) keeps. A file has no
    watch of its own without inotify: :meth:`watch` reads it twice a second and compares
    what it holds (an edit that keeps the file's size and time, within the clock's
    granularity, is still seen; the file is a few lines). Write it aside and rename it
    over the old one: a file read half-written lists fewer nodes until the next look."""

    INTERVAL = 0.5

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        self.path = Path(parts.path)
        if parts.netloc not in ("", "localhost") or not self.path.is_absolute():
            raise ConfigError(f"{url!r}: give an absolute path, file:///path/to/backends")
        self._warned: tuple[Backend | None, Backend] | None = None  # the mismatch said

    def members(self) -> list[Backend]:
        return self._parse(self._read())

    def _read(self) -> str:
        try:
            return self.path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryUnavailable(f"cannot read {self.path}: {exc}") from exc

    def _parse(self, text: str) -> list[Backend]:
        try:
            return sort(parse_backends_text(text))
        except ConfigError as exc:
            raise RegistryUnavailable(f"{self.path}: {exc}") from exc

    #: A static list: nothing registers in it, and nobody else can hold a name.
    registers = False

    def register(self, backend: Backend, *, ttl: float, token: str, renewal: bool = False) -> None:
        listed = {b.name: b for b in self.members()}.get(backend.name)
        if listed != backend and (listed, backend) != self._warned:  # (said once)
            self._warned = (listed, backend)
            log.warning(
                "statescale: %s is a static registry and lists %s, not %s; edit the file",
                self.path,
                listed.spec if listed else "no such node",
                backend.spec,
            )

    def deregister(self, name: str, *, token: str) -> None:
        """Nothing: the file is the operator's."""

    def watch(self, changed: Changed, stop: threading.Event) -> None:
        seen: str | None = None
        while not stop.is_set():
            text = self._read()
            if text != seen:
                # A file that does not parse raises: the follower keeps what it had
                # and watches again.
                members = self._parse(text)
                seen = text
                changed(members)
            stop.wait(self.INTERVAL)

    def close(self) -> None:
        pass
