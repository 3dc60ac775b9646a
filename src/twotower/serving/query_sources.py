"""Query vectors from each source a ``Query`` may start from, for one batch at a time;
and what each query of the batch leaves out of its search.

    users    -> unchanged since export, nothing in the request: precomputed vectors,
                or their kept (or transformed) exported inputs -> tower
             -> else their state from the store, with the request's on top ┐
    features -> the request's feature values and history                   ├ tower
    texts    -> the query text feature columns (and the request's history) ┘
    items    -> their own item vectors

A state (``stores.base``) becomes the tower's inputs as a raw row converted to the
stored types (features/rows.py) and its recent items as the history features' input
(``FeaturePipeline.transform``'s ``recent``): the same inputs, value for value, as
the exported user's.

Each source fills its queries' slots of a ``QueryBatch``: the vector, the label its
result carries and what its search leaves out; a query that fails gets its error in
its slot instead, and never fails the others.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from twotower.errors import DataError
from twotower.features.specs import TextFeature
from twotower.index.topk import row_pairs
from twotower.serving.artifact import Artifact
from twotower.serving.query import Query, Result, UnknownItemError, UnknownQueryError
from twotower.serving.query_states import QueryState, query_state, state_inputs
from twotower.serving.query_vectors import QueryVectors
from twotower.serving.runtime import TowerRuntime
from twotower.serving.stores.base import StateStore, UserStates
from twotower.serving.stores.memory import MemoryStore

# The most bytes the known users' model inputs may take in memory (Retriever's default).
INPUT_BUDGET = 1 << 30
CHUNK_ROWS = 4096  # queries through the tower at once


class QueryBatch:
    """The working state of one ``retrieve`` call, one slot per query."""

    def __init__(self, queries: Sequence[Query], dim: int, interests: int) -> None:
        B = len(queries)
        self.queries = list(queries)
        self.out: list[Result | DataError | None] = [None] * B  # an error, once known
        self.labels: list[Any] = [None] * B  # what each result is labelled with
        shape = (B, dim) if interests == 1 else (B, interests, dim)
        self.vectors = np.zeros(shape, dtype=np.float32)  # (B, D) or (B, K, D) queries
        self.seen_rows = np.full(B, -1, dtype=np.int64)  # query rows whose seen items go
        self.seen_items: list[np.ndarray | None] = [None] * B  # or the item rows that go
        self.states: list[dict[str, str] | None] = [None] * B  # what each read (Result.state)
        self.self_rows = np.full(B, -1, dtype=np.int64)  # item rows excluded as themselves
        self.ks = np.ones(B, dtype=np.int64)  # each valid query's k, at most N
        self.sources = ["tower"] * B  # where each query vector came from (Result.vector)

    def resolve(self, positions: list[int], rows: np.ndarray, error: type, source: str):
        """Marks the positions whose id matched no row (-1) as failed; returns the others."""
        for position, row in zip(positions, rows, strict=True):
            if row < 0:
                self.out[position] = error([getattr(self.queries[position], source)])
        return np.asarray(positions, dtype=np.int64)[rows >= 0]

    def relabel(self, positions: np.ndarray, labels: list[Any]) -> None:
        for position, label in zip(positions.tolist(), labels, strict=True):
            self.labels[position] = label

    def exclusions(self, positions: np.ndarray, artifact: Artifact) -> sp.csr_matrix | None:
        """(P, N) what the queries at ``positions`` leave out: each one's seen items, its
        ``exclude_items`` and an item itself; None when nothing is left out.

        The (query, item row) pairs of the whole batch are gathered at once, and the
        CSR arrays built from them directly, in time proportional to the excluded
        items: nothing here walks the N columns, nor builds a matrix per query.
        """
        P, N = len(positions), artifact.catalogue.num_items
        seen = self.seen_rows[positions]
        has_seen = seen >= 0
        at, cols = row_pairs(artifact.seen, seen[has_seen])  # grouped by query, in order
        at = np.flatnonzero(has_seen)[at]
        listed_at, listed = self._listed(positions, artifact)
        self_rows = self.self_rows[positions]
        itself = np.flatnonzero(self_rows >= 0)
        if len(listed) or len(itself):  # more than the seen items: regrouped by query
            at = np.concatenate([at, listed_at, itself])
            cols = np.concatenate([cols, listed, self_rows[itself]])
            known = cols >= 0  # unknown ids can never be returned anyway
            order = np.argsort(at[known], kind="stable")
            at, cols = at[known][order], cols[known][order]
        if not len(cols):
            return None
        indptr = np.zeros(P + 1, dtype=np.int64)
        np.cumsum(np.bincount(at, minlength=P), out=indptr[1:])
        ones = np.ones(len(cols), dtype=np.float32)
        return sp.csr_matrix((ones, cols, indptr), shape=(P, N))  # repeats allowed

    def _listed(self, positions: np.ndarray, artifact: Artifact) -> tuple[np.ndarray, np.ndarray]:
        """(query, item row) pairs of the items the queries at ``positions`` list
        themselves: a state's seen items (a changed user's, a request's history) and
        ``exclude_items`` (-1 for an id the catalogue does not know)."""
        states = [self.seen_items[i] for i in positions.tolist()]
        named = [self.queries[i].exclude_items for i in positions.tolist()]
        if not any(s is not None and len(s) for s in states) and not any(map(len, named)):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        counts = [0 if s is None else len(s) for s in states] + [len(n) for n in named]
        at = np.repeat(np.tile(np.arange(len(positions)), 2), counts)
        rows = artifact.item_rows([item for items in named for item in items])
        cols = np.concatenate([*(s for s in states if s is not None), rows]).astype(np.int64)
        return at, cols


class QuerySources:
    """Fills a ``QueryBatch``'s vectors from each query's source, over one artifact.

    Args:
        artifact: the loaded artifact.
        runtime: what runs its query tower.
        query_vectors: known users' precomputed vectors, or None.
        input_budget: the most bytes the known users' kept model inputs may take
            (``Retriever``'s arguments say more).
        store: where users' states live; None: a ``MemoryStore`` of the artifact.
    """

    def __init__(
        self,
        artifact: Artifact,
        runtime: TowerRuntime,
        query_vectors: QueryVectors | None,
        input_budget: int,
        store: StateStore | None = None,
    ) -> None:
        self.artifact = artifact
        self.runtime = runtime
        self.query_vectors = query_vectors
        self.store = MemoryStore(artifact) if store is None else store
        every_user_stored = query_vectors is not None and bool(query_vectors.present.all())
        self.known_inputs = None if every_user_stored else _known_inputs(artifact, input_budget)
        # the key too: a state's table then has its rows even where no feature reads
        # a column besides the history, and a request may label a row with its key
        state = artifact.pipeline.state_columns("query")
        self.query_columns = list(dict.fromkeys([*state, artifact.query_key]))
        self.text_columns = [
            spec.column for spec in artifact.pipeline.config.query if isinstance(spec, TextFeature)
        ]
        self.width = artifact.pipeline.recent_length
        self.timed = any(
            getattr(spec, "time_buckets", 0) for spec in artifact.pipeline.config.query
        )

    def with_artifact(self, artifact: Artifact) -> QuerySources:
        """These sources over a later version of the artifact (other items, the same
        users and towers): the kept inputs, precomputed vectors and store shared. The
        kept inputs stay right: a history reads its items' ids, which a row keeps."""
        new = copy.copy(self)
        new.artifact = artifact
        return new

    def embed(self, batch: QueryBatch, groups: dict[str, list[int]]) -> None:
        """Fills the vectors (or errors) of the positions of each source in ``groups``."""
        self.users(batch, groups["user"])
        self.items(batch, groups["item"])
        self.texts(batch, groups["text"])
        self.from_states(batch, groups["features"] + groups["text"], None)

    def users(self, batch: QueryBatch, positions: list[int]) -> None:
        """Known users: unchanged since export and with nothing in the request, their
        exported inputs (or precomputed vectors); else their state from the store."""
        if not positions:
            return
        queries = [batch.queries[i] for i in positions]
        users = self.artifact.query_keys.canonical([q.user for q in queries])
        rows = self.artifact.query_rows(users)  # (U,)
        plain = np.array([q.features is None and q.history is None for q in queries], bool)
        fast = (rows >= 0) & plain
        if fast.any() and isinstance(self.store, MemoryStore):
            fast[fast] = ~self.store.changed([u for u, f in zip(users, fast, strict=True) if f])
        else:
            fast[:] = False
        self._exported(batch, np.asarray(positions)[fast], rows[fast])
        rest = [p for p, f in zip(positions, fast.tolist(), strict=True) if not f]
        if not rest:
            return
        try:
            stored = self.store.read(
                [u for u, f in zip(users, fast.tolist(), strict=True) if not f]
            )
        except DataError as err:  # unreachable (503), or a state it cannot read
            for position in rest:
                batch.out[position] = err
            return
        self.from_states(batch, rest, stored)

    def _exported(self, batch: QueryBatch, known: np.ndarray, found: np.ndarray) -> None:
        """Known users in their exported state: precomputed vectors where stored, else
        their exported inputs through the tower; their seen items noted."""
        if not len(known):
            return
        stored = self.query_vectors
        ready = stored.present[found] if stored is not None else np.zeros(len(found), bool)
        if ready.any():  # precomputed: no tower pass
            batch.vectors[known[ready]] = stored.vectors[found[ready]]
            for position in known[ready].tolist():
                batch.sources[position] = "precomputed"
        if not ready.all():
            batch.vectors[known[~ready]] = self._embed_known(found[~ready])
        batch.relabel(known, self.artifact.query_id_values[found].tolist())
        wants_seen = np.array([batch.queries[i].exclude_seen for i in known], dtype=bool)
        batch.seen_rows[known[wants_seen]] = found[wants_seen]
        for position in known.tolist():
            batch.states[position] = {"features": "stored", "history": "stored"}

    def items(self, batch: QueryBatch, positions: list[int]) -> None:
        """Items: their own vectors as the query (with ``model.item_bias``, ending with
        a query's 1 instead of the item's bias); the item itself excluded."""
        if not positions:
            return
        rows = self.artifact.item_rows([batch.queries[i].item for i in positions])  # (I,)
        known, found = batch.resolve(positions, rows, UnknownItemError, "item"), rows[rows >= 0]
        vectors = self.artifact.item_vectors[found]  # (I, D): every interest, for K > 1
        if self.artifact.model_config.item_bias:  # as a query its last coordinate is 1
            vectors = vectors.copy()
            vectors[:, -1] = 1.0
        batch.vectors[known] = vectors if batch.vectors.ndim == 2 else vectors[:, None]
        batch.self_rows[known] = found
        for position in known.tolist():
            batch.sources[position] = "item"
        batch.relabel(known, self.artifact.item_id_values[found].tolist())

    def texts(self, batch: QueryBatch, positions: list[int]) -> None:
        """Refuses texts this artifact cannot read; ``from_states`` embeds the others, each in
        the query text feature columns (every other column missing)."""
        if not self.text_columns:
            error = DataError(
                "this artifact's query side has no text feature (its query features read "
                f"{', '.join(map(repr, self.query_columns))}); recall users or rows instead"
            )
            for position in positions:
                batch.out[position] = error
            return
        for position in positions:
            text = batch.queries[position].text
            if not isinstance(text, str) or not _encodes(text):
                batch.out[position] = DataError(f"text must be valid Unicode text, got {text!r}")

    def from_states(
        self, batch: QueryBatch, positions: list[int], stored: UserStates | None
    ) -> None:
        """Queries through the tower from a state: ``stored`` (the store's, one per
        position) with the request's feature values, history and text on top, or the
        request's alone (``stored`` None)."""
        missing = [False] * len(positions) if stored is None else (~stored.known).tolist()
        states = []
        for index, position in enumerate(positions):
            if batch.out[position] is not None:  # a text this artifact cannot read
                continue
            query = batch.queries[position]
            if missing[index] and query.features is None and query.history is None:
                batch.out[position] = UnknownQueryError([query.user])
                continue
            unknown = sorted(set(query.features or ()) - set(self.query_columns))
            if unknown:
                batch.out[position] = self._unknown_features(unknown)
                continue
            state = query_state(query, stored, index, self.text_columns, self.timed)
            if isinstance(state, QueryState) and state.label is None and query.features:
                state = dataclasses.replace(
                    state, label=query.features.get(self.artifact.query_key)
                )
            if isinstance(state, DataError):
                batch.out[position] = state
            else:
                states.append((position, state))
        if states:
            self._embed_states(batch, states)

    def _unknown_features(self, unknown: list[str]) -> DataError:
        """The error of a request naming feature columns the query side does not read."""
        histories = self.artifact.pipeline.recent_length > 0
        return DataError(
            f"unknown feature(s) {', '.join(map(repr, unknown))}; the query side reads "
            f"{', '.join(map(repr, self.query_columns))}"
            + ("; a user's recent items go in the query's history" if histories else "")
        )

    def _embed_states(self, batch: QueryBatch, states: list[tuple[int, QueryState]]) -> None:
        """The vectors of the queries at the positions of ``states``, from those states."""
        inputs = state_inputs([s for _, s in states], self.artifact, self.query_columns)
        for index, error in inputs.errors.items():
            batch.out[states[index][0]] = error
        if not len(inputs.kept):
            return
        artifact = self.artifact
        chunks = artifact.pipeline.transform_chunks(
            "query", inputs.table, CHUNK_ROWS, inputs.recent, artifact.history_codes
        )
        places = [states[i][0] for i in inputs.kept.tolist()]
        batch.vectors[places] = self.runtime.vectors(chunks)
        for index, position in zip(inputs.kept.tolist(), places, strict=True):
            state = states[index][1]
            batch.labels[position] = state.label
            batch.states[position] = state.used
            if batch.queries[position].exclude_seen:
                batch.seen_items[position] = inputs.seen[index]

    def _embed_known(self, rows: np.ndarray) -> np.ndarray:
        """(U, D) vectors of known query rows in their exported state: their kept inputs
        gathered (or transformed now, when they were not kept), through the tower."""
        inputs = self.known_inputs
        pieces = [rows[s : s + CHUNK_ROWS] for s in range(0, len(rows), CHUNK_ROWS)]
        if inputs is None:
            return self.runtime.vectors(self.artifact.known_inputs(piece) for piece in pieces)
        chunks = (
            {name: values[torch.from_numpy(piece)] for name, values in inputs.items()}
            for piece in pieces
        )
        return self.runtime.vectors(chunks)


def _known_inputs(artifact: Artifact, budget: int, chunk: int = CHUNK_ROWS) -> dict | None:
    """Every known query row's model inputs, transformed once (each tensor padded to
    its widest chunk), or None when they would take more than ``budget`` bytes."""
    queries = artifact.queries
    chunks = (
        artifact.known_inputs(np.arange(start, min(start + chunk, queries.num_rows)))
        for start in range(0, queries.num_rows, chunk)
    )
    first = next(chunks, None)
    if first is None:
        return None
    per_row = sum(t.element_size() * t[0].numel() for t in first.values()) if first else 0
    if per_row * queries.num_rows > budget:
        return None
    every = [first, *chunks]
    return {name: _padded_cat([c[name] for c in every]) for name in first}


def _padded_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenates along rows, zero-padding a second dimension to the widest part
    (lists are 0-padded; their encoders ignore padding)."""
    if parts[0].dim() < 2 or len({p.shape[1] for p in parts}) == 1:
        return torch.cat(parts)
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])


def _encodes(text: str) -> bool:
    """Whether ``text`` is valid Unicode (JSON can carry lone surrogates, which are not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
