"""The threads that keep an instance in a registry and a process up to date with one.

* :class:`Heartbeat`: registers an instance, renews it every third of its TTL, and
  deregisters it when stopped;
* :class:`Follower`: runs a registry's watch and hands every new membership to a
  callback; when the registry fails it keeps the last membership, says so once, and
  tries again with a growing pause (0.1 s up to 2 s) until it is back. A membership
  that lost more than half its members at once is followed only if it still holds
  ``HOLD`` seconds later (a registry that lost its data, its members coming back one
  by one, would otherwise be a new ring at each step).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable

from ...exceptions import ConfigError
from ..backends import Backend
from .base import Changed, NameTaken, Registry, RegistryUnavailable, Replaced

log = logging.getLogger("statescale.registry")

DEFAULT_TTL = 6.0  # seconds a registration lasts without a renewal
_RETRY = (0.1, 2.0)  # the first and the longest pause before trying a registry again
_SAY_AGAIN = 60.0  # seconds before the same registration failure is logged again
#: Seconds a membership that lost more than half its members at once waits before it is
#: followed: its members, renewing every third of their TTL, are back by then if the
#: registry had lost them.
HOLD = DEFAULT_TTL / 3 + 1.0


class Heartbeat:
    """Keeps ``backend`` registered in ``registry`` from a daemon thread."""

    def __init__(self, registry: Registry, backend: Backend, *, ttl: float = DEFAULT_TTL) -> None:
        self.registry = registry
        self.backend = backend
        self.ttl = ttl
        self.token = secrets.token_hex(8)  # this registration's, against a successor's
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: str | None = None  # why the last registration failed, as said
        self._said = 0.0  # when that was said
        self._held = False  # registered once: later calls are renewals
        self._replaced = False  # the last try found the name taken over by a successor

    def start(self) -> None:
        """Register now (a registry that is down is tried again from the thread), then
        renew until :meth:`stop`. A name that another instance holds at another address
        is tried for one TTL (a predecessor that crashed holds it that long at most),
        registry errors meanwhile included, then refused: :class:`ConfigError`, and
        the instance does not start."""
        patience = self.ttl + _RETRY[1]
        deadline, taken = time.monotonic() + patience, None
        while True:
            try:
                registered = self._renew(refuse_taken=True)
            except NameTaken as exc:
                taken = exc
                registered = False
            if registered or taken is None:  # (a registry down from the start: retried)
                break
            if time.monotonic() >= deadline:
                raise ConfigError(f"{taken} (still, {patience:g} s later)") from taken
            time.sleep(_RETRY[0] * 5)
        self._thread = threading.Thread(
            target=self._run, args=(registered,), name="statescale-heartbeat", daemon=True
        )
        self._thread.start()

    def _renew(self, *, refuse_taken: bool = False) -> bool:
        try:
            self.registry.register(self.backend, ttl=self.ttl, token=self.token, renewal=self._held)
        except RegistryUnavailable as exc:
            self._say(exc)
            self._replaced = isinstance(exc, Replaced)
            if refuse_taken and isinstance(exc, NameTaken):
                raise
            return False
        except Exception:  # a bug must not end the renewals: the node would drop out
            log.exception("statescale: registering %s failed; trying again", self.backend.spec)
            return False
        if self._failure is not None:
            log.warning("statescale: registered %s", self.backend.spec)
            self._failure = None
        self._held = True  # from now on, renewals (which take nothing over)
        self._replaced = False
        return True

    def _say(self, exc: RegistryUnavailable) -> None:
        """Log a failed registration: each new failure, and the same one once a minute
        (an instance out of the ring must not go unnoticed, nor fill the log)."""
        now = time.monotonic()
        if self._failure == str(exc) and now - self._said < _SAY_AGAIN:
            return
        self._failure, self._said = str(exc), now
        if isinstance(exc, NameTaken):
            log.error("statescale: %s; this instance is not in the fleet's ring", exc)
        else:
            log.warning("statescale: could not register %s: %s", self.backend.spec, exc)

    def _run(self, registered: bool) -> None:
        while not self._stop.wait(self._pause(registered)):
            registered = self._renew()

    def _pause(self, registered: bool) -> float:
        """Seconds to the next try: a renewal each third of the TTL, a failure again
        soon; but a name a successor took over (``Replaced``) only once a TTL, so that
        the successor renews first if the registry lost it (and a rollback, whose
        successor's entry lapses, still gets it back)."""
        if registered:
            return self.ttl / 3
        return self.ttl if self._replaced else _RETRY[0] * 5

    def stop(self, *, deregister: bool = True) -> None:
        """Stop renewing; with ``deregister``, leave the registry at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            if deregister:
                self.registry.deregister(self.backend.name, token=self.token)
        except RegistryUnavailable as exc:
            log.warning(
                "statescale: could not deregister %s (it drops out in %g s): %s",
                self.backend.name,
                self.ttl,
                exc,
            )
        finally:
            self.registry.close()


def wait_for_name(registry: Registry, backend: Backend, *, ttl: float = DEFAULT_TTL) -> None:
    """Before an instance serves: while another live instance holds ``backend``'s name
    at another address, wait, one TTL at most (a predecessor that crashed holds it that
    long), then :class:`ConfigError`. A registry that cannot be read is left to the
    registration to find out, and a static one (a file) holds no other instance's
    registration."""
    if not getattr(registry, "registers", True):
        return
    patience = ttl + _RETRY[1]
    deadline = time.monotonic() + patience
    taken = NameTaken(backend.name)
    for attempt in itertools.count():
        try:
            held = [m for m in registry.members() if m.name == backend.name]
        except RegistryUnavailable:
            return
        if not held or held[0].address == backend.address:
            return
        if time.monotonic() >= deadline:
            raise ConfigError(f"{taken} (still, {patience:g} s later)")
        if not attempt:
            log.warning("statescale: %s; waiting up to %g s", taken, patience)
        time.sleep(_RETRY[0] * 5)


class Follower:
    """Calls ``changed(members)`` with the registry's membership and each change."""

    def __init__(self, registry: Registry, changed: Changed) -> None:
        self.registry = registry
        self._changed = changed
        self.members: list[Backend] | None = None
        self.last_error: str | None = None  # why the registry was last unreachable
        self._failing = False
        self._seen = threading.Condition()
        self._applying = threading.Lock()
        self._held: tuple[list[Backend], int] | None = None  # a collapse not followed yet
        self._delivered = self._applied = 0  # memberships the watch gave; the last followed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="statescale-follower", daemon=True)

    def start(self) -> Follower:
        self._thread.start()
        return self

    def _on_change(self, members: list[Backend]) -> None:
        self.last_error = None
        if self._failing:
            log.warning("statescale: following %s again", self.registry.url)
            self._failing = False
        with self._seen:
            self._delivered += 1
            delivered = self._delivered
            if self._held is not None:  # a hold is on: the latest membership waits
                self._held = (members, delivered)
                return
            current = self.members
            if current and _collapse(current, members):
                # More than half gone at once: a registry that lost its data (restarted
                # empty, or frozen past the TTL) while its members register again one
                # by one. Unless held, each of their steps would be a new ring.
                self._held = (members, delivered)
                log.warning(
                    "statescale: %s lists %d of its %d members; following it in %g s",
                    self.registry.url, len(members), len(current), HOLD,
                )  # fmt: skip
                timer = threading.Timer(HOLD, self._release)
                timer.daemon = True
                timer.start()
                return
        self._apply(members, delivered)

    def _release(self) -> None:
        """The end of a hold: what the registry lists now is followed (nothing, if it
        is what was followed before: the members came back)."""
        with self._seen:
            held, self._held = self._held, None
            if held is None or held[0] == self.members or self._stop.is_set():
                return
        self._apply(*held)

    def _apply(self, members: list[Backend], delivered: int) -> None:
        """Follow ``members``, the ``delivered``-th membership the watch gave, unless
        a later one has been followed already (the watch's thread and a hold's timer
        may come in either order)."""
        with self._applying:
            if delivered <= self._applied:
                return
            self._applied = delivered
            try:
                self._changed(members)
            except Exception:  # a consumer's bug must not stop the following
                log.exception("statescale: applying a membership change failed")
            with self._seen:
                self.members = members
                self._seen.notify_all()

    def _run(self) -> None:
        pause = _RETRY[0]
        while not self._stop.is_set():
            try:
                self.registry.watch(self._on_change, self._stop)
            except RegistryUnavailable as exc:
                self.last_error = str(exc)
                if not self._failing:
                    log.warning(
                        "statescale: following %s: %s; keeping the last membership, retrying",
                        self.registry.url,
                        exc,
                    )
                    self._failing, pause = True, _RETRY[0]
            except Exception:
                log.exception("statescale: following %s failed", self.registry.url)
                self._failing = True
            self._stop.wait(pause)
            pause = min(pause * 2, _RETRY[1])
        self.registry.close()  # stopped: its connections go with the thread

    def wait(self, until: Callable[[list[Backend]], bool], timeout: float) -> bool:
        """Whether the membership comes to satisfy ``until`` within ``timeout`` seconds."""
        with self._seen:
            return self._seen.wait_for(
                lambda: self.members is not None and until(self.members), timeout
            )

    def stop(self, *, wait: bool = True) -> None:
        """Stop following: the thread ends within about a second and closes the
        registry's connections; ``wait`` for it (not on an event loop's thread)."""
        self._stop.set()
        if wait:
            self._thread.join(3)


def _collapse(current: list[Backend], members: list[Backend]) -> bool:
    """Whether ``members`` has lost more than half of ``current``."""
    kept = {b.name for b in members}
    return 2 * sum(b.name not in kept for b in current) > len(current)
