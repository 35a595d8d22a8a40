"""``statescale lb-sync``: a balancer's configuration that follows the registry.

On every membership change the configuration is written again (to a new file, checked
with the balancer's own check, then renamed over the old one: a bad one never replaces
a good one), and the balancer serving it is reloaded: ``nginx -s reload`` (new workers
take the new ring while the old ones finish their requests) or HAProxy's seamless reload
(USR2 to its master, which passes its listeners to the new process). The instances
follow the same registry, so their rings change with the balancer's; sessions that move
are handed over (:mod:`statescale.handoff`).
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from ..backends import Backend
from ..balancers import Balancer

log = logging.getLogger("statescale.registry")


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

    def text(self, members: Sequence[Backend]) -> str:
        written = self.balancer.config(members, listen=self.listen, cookie=self.cookie)
        return self.balancer.reloadable(written, self.config)

    def write(self, members: Sequence[Backend]) -> bool:
        """Write the configuration for ``members``; False if it is unchanged, or if
        the balancer's check refuses it (the old one stays)."""
        text = self.text(members)
        if self.config.exists() and self.config.read_text() == text:
            return False
        new = self.config.with_name(self.config.name + ".new")
        new.write_text(text)
        if self.balancer.check is not None:
            checked = subprocess.run(
                self.balancer.check(new), capture_output=True, text=True, check=False
            )
            if checked.returncode != 0:
                self.say(f"refused by {self.balancer.name}'s check, not applied: {checked.stderr}")
                new.unlink()
                return False
        new.replace(self.config)
        return True

    def apply(self, members: list[Backend]) -> None:
        """What the follower calls: write, then reload if the balancer runs."""
        if not members:
            self.say("the registry lists no node; keeping the configuration as it is")
            return
        if not self.write(members):
            return
        specs = ", ".join(b.spec for b in members)
        reload = self.balancer.reload
        if reload is not None and reload(self.config):
            self.say(f"{specs}: wrote {self.config}, reloaded {self.balancer.name}")
        else:
            self.say(f"{specs}: wrote {self.config} ({self.balancer.name} is not running)")
