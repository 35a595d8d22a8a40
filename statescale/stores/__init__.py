"""Session stores. ``RedisStore`` needs the ``redis`` extra and is imported on first use;
:mod:`statescale.assemble` builds the one settings ask for."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Store as Store
from .memory import MemoryStore as MemoryStore

if TYPE_CHECKING:
    from .redis import RedisStore as RedisStore


def __getattr__(name: str) -> Any:
    if name == "RedisStore":
        from .redis import RedisStore

        return RedisStore
    raise AttributeError(name)
