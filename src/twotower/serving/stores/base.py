"""What a user-state store holds and the one rule by which events change it.

A user's state is what the query tower reads of them at request time, besides the
request itself:

    features  the raw query-side feature values, {column: value}
    recent    their most recent interactions, most recent first: (item id, timestamp)
              pairs, at most ``width`` (the longest history a query feature reads)
    seen      every item they interacted with (left out of their results)

An artifact starts every known user's state (``twotower export`` writes it); events
(``POST /events``) append to it. ``MemoryStore`` keeps it in the process beside the
artifact; ``RedisStore`` in Redis, shared by every replica.

**The merge rule** (``merge_recent``), the same in both stores: an event goes after
the entries whose timestamp is later than its own and before the rest, so of equal
timestamps the one that arrived last counts as the most recent (as a later row of the
log does); an entry without a timestamp (NaN) counts as older than any with one. An
event equal to an entry already kept (the same item and timestamp) changes nothing,
so a batch sent twice is taken once. The list is then cut to ``width``. The seen
items are a set: an event adds its item.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from twotower.errors import DataError

# one kept interaction: (item id, timestamp; NaN when unknown)
Entry = tuple[Any, float]


class StoreUnavailableError(DataError):
    """The user-state store cannot be reached; the request may be retried (503)."""


@dataclasses.dataclass(frozen=True)
class Event:
    """One interaction to append to a user's state.

    Attributes:
        user: the user's query key.
        item: the item's key, as the artifact's item table holds it.
        timestamp: when it happened, in the interaction log's units.
    """

    user: Any
    item: Any
    timestamp: float


@dataclasses.dataclass(frozen=True)
class UserStates:
    """The states of a batch of users, as one read of a store gives them.

    Attributes:
        known: (U,) bool whether the store holds a state for each user.
        features: per user, its stored raw feature values ({} when none).
        recent: per user, its recent (item id, timestamp) entries, most recent first.
        seen: per user, the ids of every item it interacted with.
    """

    known: np.ndarray
    features: list[dict[str, Any]]
    recent: list[list[Entry]]
    seen: list[list[Any]]


class StateStore(Protocol):
    """Where users' states live: read a batch at a time, changed by events."""

    @property
    def name(self) -> str:
        """What the store is, for messages and ``/ready`` (no secrets)."""
        ...

    def read(self, users: Sequence[Any]) -> UserStates:
        """The states of ``users`` (query keys), in one round trip.

        Raises:
            StoreUnavailableError: the store cannot be reached.
        """
        ...

    def append(self, events: Sequence[Event], width: int) -> None:
        """Appends checked events (known items, canonical ids) to their users' states by
        the merge rule, atomically per user; a user without a state gets one.

        Raises:
            StoreUnavailableError: the store cannot be reached; no event of the batch
                may be taken as stored.
        """
        ...

    def ping(self) -> None:
        """Returns when the store answers.

        Raises:
            StoreUnavailableError: it does not.
        """
        ...

    def close(self) -> None:
        """Releases the store's connections."""
        ...


def merge_recent(current: list[Entry], events: Sequence[Entry], width: int) -> list[Entry]:
    """``current`` (most recent first) with ``events`` (in the order they arrived)
    merged in by the module's rule, cut to ``width`` entries."""
    merged = list(current)
    for item, timestamp in events:
        key = _entry_key(item, timestamp)
        if any(_entry_key(*entry) == key for entry in merged):
            continue
        place = 0
        while place < len(merged) and merged[place][1] > timestamp:  # NaN > t is False
            place += 1
        merged.insert(place, (item, timestamp))
    return merged[:width]


def _entry_key(item: Any, timestamp: float) -> tuple[Any, float | None]:
    return item, None if math.isnan(timestamp) else timestamp
