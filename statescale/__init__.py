"""statescale: session state that survives ``gunicorn -w N`` and many machines.

Two cures for per-process state, side by side: a shared Redis store, or sticky routing
to per-process memory. Start with :class:`StateScaleMiddleware` (any WSGI app) or
:class:`statescale.flask.StateScale` (Flask).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import CookieOptions as CookieOptions
from .config import Settings as Settings
from .exceptions import ConfigError as ConfigError
from .exceptions import LockTimeout as LockTimeout
from .exceptions import SerializationError as SerializationError
from .exceptions import SessionError as SessionError
from .exceptions import SessionTooLarge as SessionTooLarge
from .exceptions import StateScaleError as StateScaleError
from .exceptions import StoreError as StoreError
from .exceptions import StoreUnavailable as StoreUnavailable
from .middleware import StateScaleMiddleware as StateScaleMiddleware
from .middleware import get_session as get_session
from .session import Session as Session
from .stores import MemoryStore as MemoryStore
from .stores import Store as Store

if TYPE_CHECKING:
    from .stores.redis import RedisStore as RedisStore

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "RedisStore":  # needs the redis extra: imported only when asked for
        from .stores.redis import RedisStore

        return RedisStore
    raise AttributeError(name)
