"""Retrieval from a loaded artifact: known users, new users' rows, free text, similar items.

Framework-free: an HTTP app only turns requests into ``Query`` objects
(``twotower.serving.query``) and results into JSON (``dataclasses.asdict(result)``).
Every call reads the artifact and never changes it, so one ``Retriever`` may serve
many threads at once.

``retrieve`` answers any mix of queries together, which is what lets a server embed
concurrent requests in one pass (``sources.py`` makes each source's vectors):

    users    -> their rows of queries.parquet ┐
    features -> a table of raw rows           ├ pipeline.transform -> query tower ┐
    texts    -> the text feature columns      ┘                                   ├ (B, D)
    items    -> their item vectors ───────────────────────────────────────────────┘
        -> one catalogue search with k = the largest k, excluding per query: the user's
           logged items (``exclude_seen``), ``exclude_items``, and an item itself; a
           blocked or removed item is never returned (``twotower.serving.catalogue``);
           one search per distinct filter instead, each with its mask of allowed
           items (``filters.py``: checked and cached per filter). A query's
           exclusions and the mask are one selector inside the index search, never
           more items fetched and dropped (``twotower.index``)

A multi-interest query tower gives each user, row or text K vectors (B, K, D): the
search is then ``index.search_interests`` (each vector searched, the results merged
by best score), and each result says which interest found each item. An item query
uses its one vector for every interest (its result names no interests).

Scores are inner products of unit vectors (cosines), without the temperature.
``exclude_items`` ids that are not in the item table are ignored: such an item can
never be returned anyway. A ``k`` above the corpus size returns the whole corpus;
a result holds fewer than k items when exclusions leave fewer.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from twotower.errors import DataError
from twotower.serving.artifact import Artifact
from twotower.serving.filters import FilterMasks, Selection
from twotower.serving.query import Query, Result, UnknownQueryError, check_k
from twotower.serving.query_batch import QueryBatch
from twotower.serving.query_sources import INPUT_BUDGET, QuerySources
from twotower.serving.query_vectors import QueryVectors, read_query_vectors
from twotower.serving.runtime import tower_runtime
from twotower.serving.settings import EXACT_FILTER_LIMIT, Runtime
from twotower.serving.stores.base import Event, StateStore


class Retriever:
    """Top-k items for users, feature rows, texts or items, from one artifact.

    Args:
        artifact: the loaded artifact.
        query_vectors: known users' precomputed vectors of this artifact
            (``twotower.serving.query_vectors``), used instead of a tower pass for the
            users they hold; None: the tower computes every query vector.
        input_budget: the most bytes the known users' model inputs may take: when they
            fit, every known user's row is transformed once, here, and a request only
            gathers its users' rows; else each request transforms its users' rows.
            Not kept when ``query_vectors`` holds every known user and the query side
            reads no history (which a request could bring, to go through the tower).
        runtime: what runs the query tower (``twotower.serving.runtime``): ``torch``, or
            ``onnx`` for the ONNX graph of an artifact exported with it.
        store: where users' states live (``twotower.serving.stores``); None: in this
            process, starting from the artifact's (``MemoryStore``).
        exact_filter_limit: on an approximate index, a query whose filter keeps at
            most this many items is searched exactly over them (``Catalogue.search``).
    """

    def __init__(
        self,
        artifact: Artifact,
        query_vectors: QueryVectors | None = None,
        input_budget: int = INPUT_BUDGET,
        runtime: Runtime = "torch",
        store: StateStore | None = None,
        exact_filter_limit: int = EXACT_FILTER_LIMIT,
    ) -> None:
        self.artifact = artifact
        self.runtime = tower_runtime(artifact, runtime)
        self.sources = QuerySources(artifact, self.runtime, query_vectors, input_budget, store)
        self.exact_filter_limit = exact_filter_limit
        self.filters = FilterMasks(artifact.items)
        # built now, not on a request
        artifact.query_keys, artifact.catalogue.added_keys, artifact.catalogue.live  # noqa: B018
        artifact.history_codes  # noqa: B018

    @classmethod
    def load(
        cls, folder: Path, query_vectors: Path | None = None, runtime: Runtime = "torch"
    ) -> Retriever:
        """A retriever over the artifact in ``folder`` (verified while loading), with the
        precomputed vectors of the file ``query_vectors`` if given (checked against it),
        its query tower run by ``runtime``."""
        artifact = Artifact.load(folder)
        vectors = None if query_vectors is None else read_query_vectors(query_vectors, artifact)
        return cls(artifact, vectors, runtime=runtime)

    def with_artifact(self, artifact: Artifact) -> Retriever:
        """A retriever over ``artifact``, a later version of this one's
        (``Artifact.updated``: other items, the same users and towers), sharing this
        one's tower runtime, kept known-user inputs, precomputed vectors and store:
        nothing is built again. This one keeps answering from its own version."""
        new = copy.copy(self)
        new.artifact = artifact
        new.sources = self.sources.with_artifact(artifact)
        new.filters = FilterMasks(artifact.items)  # its masks are over the new rows
        artifact.catalogue.added_keys, artifact.catalogue.live  # noqa: B018 (built now)
        artifact.history_codes  # noqa: B018
        return new

    @property
    def num_items(self) -> int:
        """N, the item rows (blocked and removed ones included)."""
        return self.artifact.catalogue.num_items

    @property
    def interests(self) -> int:
        """K, the vectors the query tower gives each query (1 unless multi-interest)."""
        return self.artifact.query_tower.interests

    @property
    def known_inputs(self) -> dict | None:
        """The known users' model inputs kept in memory; None when not kept."""
        return self.sources.known_inputs

    @property
    def query_columns(self) -> list[str]:
        """The raw columns the query features read besides the history (which a query
        gives as its ``history``): ``FeaturePipeline.state_columns``."""
        return self.artifact.pipeline.state_columns("query")

    @property
    def store(self) -> StateStore:
        """Where the users' states live."""
        return self.sources.store

    @property
    def query_id_values(self) -> np.ndarray:
        """The query keys by query row (int64, float64 or object)."""
        return self.artifact.query_id_values

    @property
    def item_id_values(self) -> np.ndarray:
        """The item ids by item row (int64, float64 or object)."""
        return self.artifact.item_id_values

    def retrieve(self, queries: Sequence[Query]) -> list[Result | DataError]:
        """Answers any mix of queries in one tower pass per source and one index search.

        Returns:
            One entry per query, in order: its ``Result``, or the ``DataError`` that
            query alone caused (an unknown user or item, a bad feature value, k < 1,
            text for an artifact without a text feature, a bad filter). One bad query
            never fails the others.
        """
        batch = QueryBatch(queries, self.artifact.item_vectors.shape[1], self.interests)
        groups = batch.plan(self.num_items)
        selections = self._selections(batch, groups)  # checked before any tower pass
        self.sources.embed(batch, groups)
        for positions, allowed in _by_filter(batch, selections):
            self._answer(batch, positions, allowed)
        return batch.answers()

    def _selections(self, batch: QueryBatch, groups: dict[str, np.ndarray]) -> dict[int, Selection]:
        """The filtered queries' masks, by position; a query whose filter is bad gets
        its error instead and leaves its group."""
        selections: dict[int, Selection] = {}
        failed = False
        for positions in groups.values():
            for position in positions[batch.filtered[positions]].tolist():
                try:
                    selections[position] = self.filters.select(batch.queries[position].filter)
                except DataError as err:
                    batch.out[position] = err
                    failed = True
        if failed:
            for name, positions in groups.items():
                groups[name] = positions[np.equal(batch.out[positions], None)]
        return selections

    def ingest(self, events: Sequence[Event]) -> list[tuple[int, str]]:
        """Appends ``events`` to their users' states in the store (``stores.base``:
        each user's at once, by the merge rule): every event whose item this artifact
        holds, each other one refused.

        Returns:
            (position, reason) of each refused event; the others are stored.

        Raises:
            StoreUnavailableError: the store cannot be reached; no event of the batch
                may be taken as stored.
        """
        rows = self.artifact.item_rows([event.item for event in events])
        ids = self.item_id_values[np.maximum(rows, 0)].tolist() if len(rows) else []
        refused = [(i, f"unknown item id {e.item!r}") for i, e in enumerate(events) if rows[i] < 0]
        users = self.artifact.query_keys.canonical([event.user for event in events])
        taken = [  # as the artifact spells its ids
            dataclasses.replace(event, user=users[i], item=ids[i])
            for i, event in enumerate(events)
            if rows[i] >= 0
        ]
        self.store.append(taken, self.artifact.pipeline.recent_length)
        return refused

    def recall_users(
        self,
        user_ids: Sequence[Any],
        k: int,
        exclude_seen: bool = True,
        exclude_items: Sequence[Any] | None = None,
    ) -> list[Result]:
        """Top-k items for known users, each with every logged interaction as history.

        Args:
            user_ids: query keys of ``queries.parquet``.
            k: items per user (>= 1).
            exclude_seen: leave out the items each user already interacted with.
            exclude_items: item ids left out for every user.

        Raises:
            UnknownQueryError: some ids are not known queries (all of them are named).
        """
        check_k(k)
        extra = tuple(exclude_items or ())
        answers = self.retrieve(
            [Query(user=u, k=k, exclude_seen=exclude_seen, exclude_items=extra) for u in user_ids]
        )
        unknown = [a.ids[0] for a in answers if isinstance(a, UnknownQueryError)]
        if unknown:
            raise UnknownQueryError(unknown)
        return _raise_first(answers)

    def recall_rows(
        self, rows: pa.Table, k: int, exclude_items: Sequence[Any] | None = None
    ) -> list[Result]:
        """Top-k items for raw query-side feature rows, e.g. of users not in the artifact.

        Each row is a ``Query(features=...)`` of the columns the query features read,
        converted to the artifact's types as a request's rows are.

        Args:
            rows: a table with every column the query features read; a user the
                artifact does not know has an empty history and an unseen id.
            k: items per row (>= 1).
            exclude_items: item ids left out for every row.

        Returns:
            One result per row, labelled with the row's query key (its position when
            ``rows`` has no key column).

        Raises:
            DataError: ``rows`` lacks columns the query features read (all named), or
                a value does not convert to its column's type (the first such row's).
        """
        check_k(k)
        missing = [c for c in self.query_columns if c not in rows.column_names]
        if missing:
            raise DataError(
                f"the query rows lack column(s) {', '.join(map(repr, missing))}, which the "
                f"query features read; they have {', '.join(map(repr, rows.column_names))}"
            )
        key = self.artifact.query_key
        labels = (
            rows.column(key).to_pylist() if key in rows.column_names else list(range(rows.num_rows))
        )
        extra = tuple(exclude_items or ())
        features = rows.select(self.query_columns).to_pylist()
        answers = _raise_first(
            self.retrieve([Query(features=f, k=k, exclude_items=extra) for f in features])
        )
        return [
            dataclasses.replace(a, query=label) for a, label in zip(answers, labels, strict=True)
        ]

    def recall_text(
        self, texts: Sequence[str], k: int, exclude_items: Sequence[Any] | None = None
    ) -> list[Result]:
        """Top-k items for free-text queries (artifacts whose query side reads text).

        Each text fills the column(s) of the query text features; every other query
        column is empty (missing values, as for a query never seen).

        Raises:
            DataError: the artifact's query side has no text feature.
        """
        check_k(k)
        extra = tuple(exclude_items or ())
        return _raise_first(self.retrieve([Query(text=t, k=k, exclude_items=extra) for t in texts]))

    def similar_items(self, item_id: Any, k: int) -> Result:
        """The k items whose vectors have the highest inner product with this item's
        (with ``model.item_bias``: cosine plus the other item's bias coordinate).

        The item itself is never returned.

        Raises:
            UnknownItemError: ``item_id`` is not in the item table.
        """
        check_k(k)
        return _raise_first(self.retrieve([Query(item=item_id, k=k)]))[0]

    def _answer(self, batch: QueryBatch, live: np.ndarray, allowed: np.ndarray | None) -> None:
        """Searches for the ``live`` positions of ``batch`` (those without an error),
        among the ``allowed`` items only (None: every item), and puts each one's
        ``Result`` in its slot."""
        exclude = batch.exclusions(live, self.artifact)
        self._search(batch, live, exclude, allowed)

    def _search(
        self,
        batch: QueryBatch,
        live: np.ndarray,
        exclude: sp.csr_matrix | None,
        allowed: np.ndarray | None,
    ) -> None:
        """One catalogue search of the ``live`` queries' vectors for their largest k,
        each leaving out its row of ``exclude`` (item rows) and every item ``allowed``
        leaves out (and never a blocked or removed one); then each query's Result from
        its row of the (P, k) answer, cut to its own k, padding left out."""
        ks = batch.ks[live]
        ids, scores, interests = self.artifact.catalogue.search(
            batch.vectors[live], int(ks.max()), exclude, allowed, self.exact_filter_limit
        )
        kept = (ids >= 0) & (np.arange(ids.shape[1]) < ks[:, None])  # (P, k)
        items = _split(self.item_id_values[ids[kept]].tolist(), kept)
        values = _split(scores[kept].tolist(), kept)
        found = [None] * len(live) if interests is None else _split(interests[kept].tolist(), kept)
        if interests is not None:  # an item query's one vector is every interest: none named
            for place in np.flatnonzero(batch.self_rows[live] >= 0).tolist():
                found[place] = None
        labels, sources, states = (column[live].tolist() for column in batch.result_columns)
        batch.answer(live, list(map(Result, labels, items, values, found, sources, states)))


def _by_filter(
    batch: QueryBatch, selections: dict[int, Selection]
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """The positions of ``batch`` still to answer, one group per distinct filter (its
    mask of allowed items; None: no filter), each searched once."""
    live = batch.pending()
    if not selections:
        return [(live, None)] if len(live) else []
    filtered = batch.filtered[live]
    groups: dict[tuple, list[int]] = {}
    for position in live[filtered].tolist():
        groups.setdefault(selections[position].key, []).append(position)
    plain = [(live[~filtered], None)] if (~filtered).any() else []
    return plain + [
        (np.array(positions), selections[positions[0]].mask) for positions in groups.values()
    ]


def _split(values: list, kept: np.ndarray) -> list[list]:
    """``values`` (the kept entries of (B, k) ``kept``, row by row) as one list per row."""
    ends = np.cumsum(kept.sum(axis=1)).tolist()
    return [values[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]


def _raise_first(answers: list[Result | DataError]) -> list[Result]:
    for answer in answers:
        if isinstance(answer, DataError):
            raise answer
    return answers  # type: ignore[return-value]
