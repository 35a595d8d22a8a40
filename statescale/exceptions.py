"""The errors statescale raises.

::

    StateScaleError
     +-- ConfigError            a setting that cannot work; raised at construction
     +-- SessionError           the application asked for something a session cannot hold
     |    +-- SerializationError     a value is not JSON-serializable (names the key)
     |    +-- SessionTooLarge        the encoded session exceeds ``max_size``
     +-- StoreError             the session store could not do its job
          +-- StoreUnavailable       Redis refused, timed out or failed over (-> 503)
          +-- LockTimeout            the per-session lock was not acquired in time (-> 503)

The middleware turns ``StoreError`` into ``503 Service Unavailable`` with
``Retry-After``; ``SessionError`` is a bug in the application and is left to it.
"""

from __future__ import annotations


class StateScaleError(Exception):
    """Root of every error statescale raises on purpose."""


class ConfigError(StateScaleError, ValueError):
    """A setting that cannot work. The message says what to change."""


class SessionError(StateScaleError):
    """The application put something into a session that the session cannot hold."""


class SerializationError(SessionError, TypeError):
    """A session value is not JSON-serializable."""

    def __init__(self, key: str, value: object, reason: str = "") -> None:
        self.key = key
        self.value_type = type(value).__name__
        why = f" ({reason})" if reason else ""  # what inside it JSON refused
        super().__init__(
            f"session[{key!r}]: a {self.value_type} cannot be stored{why}; session values "
            "must be JSON-serializable (str, int, float, bool, None, list, dict)"
        )


class SessionTooLarge(SessionError):
    """Storing a value would make the encoded session larger than ``max_size``."""

    def __init__(self, key: str, size: int, limit: int) -> None:
        self.key = key
        self.size = size
        self.limit = limit
        super().__init__(
            f"session[{key!r}]: the session would be {size} bytes, over the limit of "
            f"{limit} bytes (max_size); nothing was changed"
        )


class StoreError(StateScaleError):
    """The session store failed. ``retry_after`` is a hint in seconds for clients."""

    retry_after: int = 1


class StoreUnavailable(StoreError):
    """The store could not be reached in time (refused, timed out, failing over)."""

    def __init__(self, store: str, reason: str) -> None:
        self.store = store
        self.reason = reason
        super().__init__(f"{store} unavailable: {reason}")


class LockTimeout(StoreError):
    """Another request of the same session held its lock for longer than the wait."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        super().__init__(f"session lock not acquired within {wait:g}s")
