"""A query's user state, and the query tower's inputs for a batch of them.

A query through the tower reads a state: the store's (``stores.base``) with what the
request gives on top (``query.py``'s module doc says which wins), or the request's
alone. ``state_inputs`` turns a batch of states into what ``FeaturePipeline.transform``
takes: a table of raw feature values converted to the stored types (features/rows.py)
and the recent items as item rows (``Recent``), with each state's seen item rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import pyarrow as pa

from twotower.errors import DataError
from twotower.features.history import Recent
from twotower.features.rows import rows_table
from twotower.serving.artifact import Artifact
from twotower.serving.query import Query, UnknownItemError
from twotower.serving.stores.base import UserStates


@dataclasses.dataclass(frozen=True)
class QueryState:
    """What the tower reads for one query: raw feature values, recent (item id,
    timestamp) entries most recent first, seen item ids; its label and provenance."""

    features: dict[str, Any]
    recent: list[tuple[Any, float]]
    seen: list[Any]
    label: Any
    used: dict[str, str]
    from_request: bool  # the recent items are the request's: unknown ones are errors


def query_state(
    query: Query,
    stored: UserStates | None,
    index: int,
    text_columns: list[str],
    timed: bool,
) -> QueryState | DataError:
    """One query's state: the stored one (``stored``'s ``index``-th, if any) with what
    the request gives on top (the module doc of ``serving.query`` says how)."""
    known = stored is not None and bool(stored.known[index])
    features = dict(stored.features[index]) if known else {}
    recent = list(stored.recent[index]) if known else []
    seen = list(stored.seen[index]) if known else []
    given = dict(query.features or {})
    if query.text is not None:
        given.update({column: query.text for column in text_columns})
    features.update(given)
    used_features = ("stored+request" if given else "stored") if features and known else "none"
    if given and not known:
        used_features = "request"
    history = "stored" if known and recent else "none"
    if query.history is not None:
        entries = request_history(query, timed)
        if isinstance(entries, DataError):
            return entries
        recent, history = entries, "request"
        seen.extend(item for item, _ in entries)
    label = query.user if query.user is not None else query.text
    return QueryState(
        features,
        recent,
        seen,
        label,
        {"features": used_features, "history": history},
        query.history is not None,
    )


def request_history(query: Query, timed: bool) -> list[tuple[Any, float]] | DataError:
    """A request's history as (item, timestamp) entries, most recent first."""
    items = list(query.history or ())
    times = query.history_times
    if times is None:
        if timed and items:
            return DataError(
                "this artifact's history features read timestamps (time_buckets): give "
                "history_times beside the history"
            )
        return [(item, float("nan")) for item in reversed(items)]
    if len(times) != len(items):
        return DataError(
            f"history_times has {len(times)} timestamps for {len(items)} history items"
        )
    try:
        stamps = np.asarray(times, dtype=np.float64)
    except (TypeError, ValueError):
        return DataError(f"history_times must be numbers, got {list(times)[:5]!r}")
    if not np.isfinite(stamps).all():
        return DataError("history_times must be finite numbers")
    order = np.argsort(stamps, kind="stable")[::-1]  # latest first; of equal, last given
    return [(items[i], float(stamps[i])) for i in order.tolist()]


@dataclasses.dataclass(frozen=True)
class StateInputs:
    """What the tower reads for a batch of states, and which of them failed.

    Attributes:
        kept: (K,) the positions (in the states given) of those without an error.
        table: their raw feature values, one row each, typed as the stored queries.
        recent: their recent items (item rows), most recent first.
        seen: per state given, its seen item rows (empty for a failed one).
        errors: the error of each failed state, by position.
    """

    kept: np.ndarray
    table: pa.Table
    recent: Recent
    seen: list[np.ndarray]
    errors: dict[int, DataError]


@dataclasses.dataclass(frozen=True)
class RecentEntries:
    """Lists of recent (item id, timestamp) entries, one per query, resolved to item
    rows at once.

    Attributes:
        rows: (E,) int64 each entry's item row; -1 where the artifact does not hold it.
        times: (E,) float64 their timestamps.
        owner: (E,) the list each entry is of.
        unknown: the item ids each list names that the artifact does not hold, in its
            order, by list (only lists that name any).
    """

    rows: np.ndarray
    times: np.ndarray
    owner: np.ndarray
    unknown: dict[int, list[Any]]

    def known_rows(self, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Of the lists ``keep`` (L,) marks: how many known items each has, and (E,)
        which entries those are (in list order, so ``rows[valid]`` is them in turn)."""
        valid = (self.rows >= 0) & keep[self.owner]
        return np.bincount(self.owner[valid], minlength=len(keep))[keep], valid

    def recent(self, keep: np.ndarray, width: int) -> Recent:
        """The kept lists' known items as the history features' input, ``width`` each."""
        lengths, valid = self.known_rows(keep)
        return Recent.ragged(lengths, self.rows[valid], self.times[valid], width)


def resolve_recent(lists: list[list[tuple[Any, float]]], artifact: Artifact) -> RecentEntries:
    """Every list's entries resolved to ``artifact``'s item rows in one lookup."""
    flat = [entry for entries in lists for entry in entries]
    rows = artifact.item_rows([item for item, _ in flat])
    times = np.array([stamp for _, stamp in flat], np.float64)
    owner = np.repeat(np.arange(len(lists)), [len(entries) for entries in lists])
    unknown: dict[int, list[Any]] = {}
    for index in np.flatnonzero(rows < 0).tolist():
        unknown.setdefault(int(owner[index]), []).append(flat[index][0])
    return RecentEntries(rows, times, owner, unknown)


def state_inputs(states: list[QueryState], artifact: Artifact, columns: list[str]) -> StateInputs:
    """The tower's inputs for ``states`` over ``artifact``: feature values of
    ``columns``; recent items resolved to item rows (a request naming an unknown item
    fails; an item a stored state names that the artifact no longer holds is left out)."""
    count = len(states)
    entries = resolve_recent([s.recent for s in states], artifact)
    errors: dict[int, DataError] = {
        index: UnknownItemError(items)
        for index, items in entries.unknown.items()
        if states[index].from_request
    }
    features = [s.features for s in states]
    check = functools.partial(artifact.pipeline.row_errors, "query")
    table, invalid = rows_table(features, columns, artifact.queries.schema, check)
    if errors:  # the states the table holds that failed on their recent items
        converted = [i for i in range(count) if i not in invalid]  # the table's rows
        table = table.filter(pa.array([i not in errors for i in converted], pa.bool_()))
    errors.update(invalid)
    keep = np.array([i not in errors for i in range(count)], dtype=bool)
    recent = entries.recent(keep, max(artifact.pipeline.recent_length, 1))
    seen_rows = artifact.item_rows([item for s in states for item in s.seen])
    cuts = np.cumsum([len(s.seen) for s in states])[:-1]
    seen = [rows[rows >= 0] for rows in np.split(seen_rows, cuts)] if count else []
    return StateInputs(np.flatnonzero(keep), table, recent, seen, errors)
