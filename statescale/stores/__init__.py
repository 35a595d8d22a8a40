"""Session stores. ``RedisStore`` needs the ``redis`` extra and is imported on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Store as Store
from .memory import MemoryStore as MemoryStore

if TYPE_CHECKING:
    from ..config import Settings
    from .redis import RedisStore as RedisStore


def __getattr__(name: str) -> Any:
    if name == "RedisStore":
        from .redis import RedisStore

        return RedisStore
    raise AttributeError(name)


def build_store(settings: Settings) -> Store:
    """The store ``settings`` asks for; Redis without a URL starts the embedded server."""
    idle, absolute = settings.idle_timeout, settings.absolute_lifetime
    if settings.store == "memory":
        return MemoryStore(idle_timeout=idle, absolute_lifetime=absolute)
    from ..embedded import embedded_redis_url
    from .redis import RedisStore

    url = settings.redis_url or embedded_redis_url()
    store = RedisStore.from_url(
        url,
        timeout=settings.redis_timeout,
        local_cache=settings.local_cache,
        idle_timeout=idle,
        absolute_lifetime=absolute,
    )
    if not settings.redis_url:
        # This process's own server: other worker processes cannot see it (the middleware
        # warns under several workers; statescale.gunicorn's hooks share one instead).
        store.per_process = True
    return store
