"""``statescale lb-sync``: a balancer's configuration that follows the registry.

On every membership change the configuration is written again (to a new file, checked
with the balancer's own check, then renamed over the old one: a bad one never replaces
a good one), and the balancer serving it is reloaded: ``nginx -s reload`` (new workers
take the new ring while the old ones finish their requests) or HAProxy's seamless reload
(USR2 to its master, which passes its listeners to the new process). What failed is
tried again every ``RETRY`` seconds, and a reload that failed is tried again by the next
run too (``FILE.reloaded`` says what the balancer was last reloaded with).
The instances follow the same registry, so their rings change with the balancer's;
sessions that move are handed over (:mod:`statescale.handoff`).
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from ...exceptions import ConfigError
from ..backends import Backend
from ..balancers import Balancer

log = logging.getLogger("statescale.registry")

RETRY = 5.0  # seconds between tries of a membership that could not be applied


class ConfigSync:
    """Keeps ``config`` (for ``balancer``, listening on ``listen``) to the members."""

    def __init__(
        self,
        balancer: Balancer,
        config: Path,
        *,
        listen: str,
        cookie: str,
        say: Callable[[str], None] = print,
    ) -> None:
        self.balancer = balancer
        self.config = config
        self.listen = listen
        self.cookie = cookie
        self.say = say
        self._lock = threading.Lock()  # the follower's thread applies, the retries too
        self._wanted: list[Backend] | None = None  # the last membership given
        self._done = False  # ... and whether it was applied, the balancer reloaded
        # What the balancer serving the file was last reloaded with, beside it: a reload
        # that failed after its file was written is owed, in a later run too.
        self._stamp = config.with_name(config.name + ".reloaded")
        self._reload_owed = not self._stamped()
        self._last_failure: str | None = None

    def text(self, members: Sequence[Backend]) -> str:
        written = self.balancer.config(members, listen=self.listen, cookie=self.cookie)
        return self.balancer.reloadable(written, self.config)

    def write(self, members: Sequence[Backend]) -> bool:
        """Write the configuration for ``members``; False if it is unchanged. Raises
        :class:`ConfigError`, saying why, if it cannot be written or the balancer's
        check refuses it (the old one stays)."""
        text = self.text(members)
        if self.config.exists() and self.config.read_text() == text:
            return False
        new = self.config.with_name(self.config.name + ".new")
        try:
            new.write_text(text)
            self._check(new)
            new.replace(self.config)
        except OSError as exc:
            raise ConfigError(f"cannot write {self.config}: {exc}") from exc
        finally:
            new.unlink(missing_ok=True)
        return True

    def _check(self, new: Path) -> None:
        if self.balancer.check is None:
            return
        name = self.balancer.name
        try:
            checked = subprocess.run(
                self.balancer.check(new), capture_output=True, text=True, check=False, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"could not run {name}'s check ({exc}); is it installed?") from exc
        if checked.returncode != 0:
            why = (checked.stderr + checked.stdout).strip() or f"exit status {checked.returncode}"
            raise ConfigError(f"{name}'s check refused the configuration, not applied:\n{why}")

    def apply(self, members: list[Backend]) -> bool:
        """What the follower calls: write, then reload if the balancer runs. False if
        the configuration could not be written (said, and the old one stays). What
        failed (the write, or the reload) is tried again by :meth:`retry`."""
        with self._lock:
            self._wanted = members
            return self._apply(members)

    def retry(self) -> None:
        """Apply the last membership again, if it failed (a check or a reload that
        failed once: a resolver's blip, a timeout); the registry may not change again
        for a long time."""
        with self._lock:
            if self._wanted is not None and not self._done:
                self._apply(self._wanted)

    def _apply(self, members: list[Backend]) -> bool:
        self._done = False
        if not members:
            self.say("the registry lists no node; keeping the configuration as it is")
            self._done = True
            return True
        specs = ", ".join(b.spec for b in members)
        try:
            written = self.write(members)
        except ConfigError as exc:
            self._failed(f"{specs}: {exc}", "could not apply %s: %s", specs, exc)
            return False
        if not written and not self._reload_owed:
            self._done, self._last_failure = True, None
            return True
        reload = self.balancer.reload
        try:
            reloaded = reload is not None and reload(self.config)
        except ConfigError as exc:
            self._reload_owed = True  # the file is new, the balancer is not: again later
            said = f"{specs}: wrote {self.config}; {exc}"
            self._failed(said, "could not reload %s: %s", self.balancer.name, exc)
            return True
        self._reload_owed = False
        try:  # (unwritten, the next run reloads once more: no harm)
            self._stamp.write_text(_digest(self.config.read_text()))
        except OSError as exc:
            log.warning("statescale: lb-sync could not write %s: %s", self._stamp, exc)
        self._last_failure = None
        what = f"wrote {self.config}" if written else f"{self.config} as it was"
        if reloaded:
            self.say(f"{specs}: {what}, reloaded {self.balancer.name}")
        else:
            self.say(f"{specs}: {what} ({self.balancer.name} is not running)")
        self._done = True
        return True

    def _stamped(self) -> bool:
        """Whether the balancer serving the file (if one does) was reloaded with it."""
        try:
            return self._stamp.read_text() == _digest(self.config.read_text())
        except OSError:
            return False

    @property
    def applied(self) -> bool:
        """Whether the last membership given is written and the balancer reloaded."""
        return self._done

    def _failed(self, said: str, logged: str, *args: object) -> None:
        """Say what failed, once while it fails the same way (it is tried again)."""
        if said != self._last_failure:
            self._last_failure = said
            self.say(said)
            log.error("statescale: lb-sync " + logged, *args)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
