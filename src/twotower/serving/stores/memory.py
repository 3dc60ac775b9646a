"""Users' states in the serving process: the artifact's, as events have changed them.

The default store. A user no event has touched is read straight from the artifact
(its rows of queries.parquet, recent.npz and seen.npz; the retriever then keeps its
fast paths: precomputed vectors or inputs transformed once). An event copies its
user's state out of the artifact once and changes the copy by the merge rule
(``stores.base``); a user the artifact does not know starts from nothing.

The changes live in this process only: they are lost when it stops, and each worker
of several holds its own. ``carried`` hands them to the store of a reloaded artifact.
Where they must outlive the process or be shared, use the Redis store.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from twotower.features.ragged import spans
from twotower.serving.artifact import Artifact
from twotower.serving.stores.base import Entry, Event, UserStates, merge_recent


@dataclasses.dataclass
class _Changed:
    """A user's state since events changed it."""

    features: dict[str, Any]
    recent: list[Entry]
    seen: set[Any]


class MemoryStore:
    """The artifact's users' states, and the changes events made to them.

    Args:
        artifact: the artifact whose known users start with their exported state.
    """

    name = "memory"

    def __init__(self, artifact: Artifact) -> None:
        self.artifact = artifact
        self._changed: dict[str, _Changed] = {}
        self._lock = threading.Lock()

    def changed(self, users: Sequence[Any]) -> np.ndarray:
        """(U,) bool whether events changed each user's state since the artifact loaded."""
        keys = self._keys(users)
        with self._lock:
            return np.array([key in self._changed for key in keys], dtype=bool)

    def read(self, users: Sequence[Any]) -> UserStates:
        rows = self.artifact.query_rows(users)
        keys = self._keys(users, rows)
        with self._lock:
            changed = [self._changed.get(key) for key in keys]
        exported = np.flatnonzero((rows >= 0) & np.array([c is None for c in changed], bool))
        stored = artifact_states(self.artifact, rows[exported])
        states = UserStates(
            known=(rows >= 0) | np.array([c is not None for c in changed], dtype=bool),
            features=[c.features.copy() if c else {} for c in changed],
            recent=[list(c.recent) if c else [] for c in changed],
            seen=[sorted(c.seen, key=str) if c else [] for c in changed],
        )
        for place, position in enumerate(exported.tolist()):
            states.features[position] = stored.features[place]
            states.recent[position] = stored.recent[place]
            states.seen[position] = stored.seen[place]
        return states

    def append(self, events: Sequence[Event], width: int) -> None:
        by_user: dict[str, list[Event]] = {}
        for key, event in zip(self._keys([e.user for e in events]), events, strict=True):
            by_user.setdefault(key, []).append(event)
        with self._lock:  # one user's events change its state at once
            for key, batch in by_user.items():
                state = self._changed.get(key) or self._start(batch[0].user)
                pairs = [(e.item, float(e.timestamp)) for e in batch]
                state.recent = merge_recent(state.recent, pairs, width)
                state.seen.update(e.item for e in batch)
                self._changed[key] = state

    def ping(self) -> None:
        """Always answers: the store is this process."""

    def close(self) -> None:
        """Nothing to release."""

    def carried(self, artifact: Artifact) -> MemoryStore:
        """The store of a reloaded ``artifact``: each changed user starts from its state
        in the new artifact (its features, recent and seen items), then takes its
        recent entries and seen items from this store (the merge rule keeps an entry
        once where the new artifact holds it too)."""
        store = MemoryStore(artifact)
        width = artifact.pipeline.recent_length
        with self._lock:
            changed = dict(self._changed)
        for key, change in changed.items():
            state = store._start(key)
            state.recent = merge_recent(state.recent, change.recent[::-1], width)
            state.seen |= change.seen
            store._changed[key] = state
        return store

    def _start(self, user: Any) -> _Changed:
        """A copy of ``user``'s state in the artifact; empty when it is not there."""
        (row,) = self.artifact.query_rows([user])
        if row < 0:
            return _Changed({}, [], set())
        stored = artifact_states(self.artifact, np.array([row]))
        return _Changed(stored.features[0], stored.recent[0], set(stored.seen[0]))

    def _keys(self, users: Sequence[Any], rows: np.ndarray | None = None) -> list[str]:
        """One text per user, whatever type a request gives its id in: the artifact's
        own key for a user it knows."""
        rows = self.artifact.query_rows(users) if rows is None else rows
        own = self.artifact.query_id_values[np.maximum(rows, 0)].tolist() if len(rows) else []
        return [str(o if r >= 0 else u) for u, o, r in zip(users, own, rows.tolist(), strict=True)]


def artifact_states(artifact: Artifact, rows: np.ndarray) -> UserStates:
    """The exported states of known query ``rows``: their stored feature values (the
    columns a request may give), recent entries and seen items, by item id."""
    names = artifact.queries.schema.names
    columns = [c for c in artifact.pipeline.state_columns("query") if c in names]
    # (a table of no column has no row to list: then every state's values are none)
    features = (
        artifact.queries.select(columns).take(rows).to_pylist()
        if columns
        else [{} for _ in range(len(rows))]
    )
    ids, recent, seen = artifact.item_id_values, artifact.recent, artifact.seen
    recent_ids = _rows_of(ids, recent.rows, recent.indptr, rows)
    times = _rows_of(None, recent.times, recent.indptr, rows)
    entries = [list(zip(i, t, strict=True)) for i, t in zip(recent_ids, times, strict=True)]
    seen_ids = _rows_of(ids, seen.indices, seen.indptr, rows)
    return UserStates(np.ones(len(rows), dtype=bool), features, entries, seen_ids)


def _rows_of(
    ids: np.ndarray | None, values: np.ndarray, indptr: np.ndarray, rows: np.ndarray
) -> list[list[Any]]:
    """Rows ``rows`` of a ragged array (``values`` cut at ``indptr``) as lists, each
    value mapped through ``ids`` (item row -> id) unless None."""
    starts, lengths = indptr[rows], indptr[rows + 1] - indptr[rows]
    flat = values[spans(starts, lengths)]
    flat = (flat if ids is None else ids[flat]).tolist()
    ends = np.cumsum(lengths).tolist()
    return [flat[end - n : end] for end, n in zip(ends, lengths.tolist(), strict=True)]
