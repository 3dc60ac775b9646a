"""Where served users' states live (``base``): in the service (``memory``) or in Redis
(``redis_store``), shared by every replica."""

from __future__ import annotations

from twotower.serving.stores.base import (
    Event,
    StateStore,
    StoreUnavailableError,
    UserStates,
    merge_recent,
)
from twotower.serving.stores.memory import MemoryStore


def open_store(url: str) -> StateStore:
    """The store at ``url``: a Redis URL (``settings.check_state_url``)."""
    from twotower.serving.stores.redis_store import RedisStore  # the client only when used

    return RedisStore(url)


__all__ = [
    "Event",
    "MemoryStore",
    "StateStore",
    "StoreUnavailableError",
    "UserStates",
    "merge_recent",
    "open_store",
]
