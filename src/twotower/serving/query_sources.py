"""Query vectors from each source a ``Query`` may start from, for one batch at a time.

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

import numpy as np
import torch

from twotower.errors import DataError
from twotower.features.specs import TextFeature
from twotower.serving.artifact import Artifact
from twotower.serving.query import UnknownItemError, UnknownQueryError
from twotower.serving.query_batch import QueryBatch
from twotower.serving.query_states import (
    QueryState,
    query_state,
    request_history,
    resolve_recent,
    state_inputs,
)
from twotower.serving.query_vectors import QueryVectors
from twotower.serving.runtime import TowerRuntime
from twotower.serving.stores.base import StateStore, UserStates
from twotower.serving.stores.memory import MemoryStore

# The most bytes the known users' model inputs may take in memory (Retriever's default).
INPUT_BUDGET = 1 << 30
CHUNK_ROWS = 4096  # queries through the tower at once
STORED = {"features": "stored", "history": "stored"}  # what a user as exported reads


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
        # a known user whose request brings a history is embedded from its kept inputs,
        # precomputed vector or not: they are kept unless nothing would read them
        unread = every_user_stored and artifact.pipeline.recent_length == 0
        self.known_inputs = None if unread else _known_inputs(artifact, input_budget)
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
        # a result's state for a known user whose request brings a history: its stored
        # feature values (if the query side reads any) and the request's history
        stored = [c for c in state if c in artifact.queries.schema.names]
        self.request_history_state = {
            "features": "stored" if stored else "none",
            "history": "request",
        }

    def with_artifact(self, artifact: Artifact) -> QuerySources:
        """These sources over a later version of the artifact (other items, the same
        users and towers): the kept inputs, precomputed vectors and store shared. The
        kept inputs stay right: a history reads its items' ids, which a row keeps."""
        new = copy.copy(self)
        new.artifact = artifact
        return new

    def embed(self, batch: QueryBatch, groups: dict[str, np.ndarray]) -> None:
        """Fills the vectors (or errors) of the positions of each source in ``groups``."""
        self.users(batch, groups["user"])
        self.items(batch, groups["item"])
        self.texts(batch, groups["text"])
        through_tower = np.concatenate([groups["features"], groups["text"]])
        self.from_states(batch, through_tower.tolist(), None)

    def users(self, batch: QueryBatch, positions: np.ndarray) -> None:
        """Known users: unchanged since export and with nothing in the request, their
        exported inputs (or precomputed vectors); else their state from the store."""
        if not len(positions):
            return
        users = self.artifact.query_keys.canonical([batch.queries[i].user for i in positions])
        rows = self.artifact.query_rows(users)  # (U,)
        bare, history = batch.bare(positions), batch.history_alone(positions)
        if self.known_inputs is None:  # a request's history then goes through its state
            history[:] = False
        fast = (rows >= 0) & (bare | history)  # each read as exported, but for a history
        users = np.array(users, dtype=object) if users else np.zeros(0, dtype=object)
        if fast.any() and isinstance(self.store, MemoryStore):
            fast[fast] = ~self.store.changed(users[fast].tolist())
        else:
            fast[:] = False
        self._exported(batch, positions[fast & bare], rows[fast & bare])
        self._exported_with_history(batch, positions[fast & history], rows[fast & history])
        rest = positions[~fast]
        if not len(rest):
            return
        try:
            stored = self.store.read(users[~fast].tolist())
        except DataError as err:  # unreachable (503), or a state it cannot read
            batch.out[rest] = err
            return
        self.from_states(batch, rest.tolist(), stored)

    def _exported(self, batch: QueryBatch, known: np.ndarray, found: np.ndarray) -> None:
        """Known users in their exported state: precomputed vectors where stored, else
        their exported inputs through the tower; their seen items noted."""
        if not len(known):
            return
        stored = self.query_vectors
        ready = stored.present[found] if stored is not None else np.zeros(len(found), bool)
        if ready.any():  # precomputed: no tower pass
            batch.vectors[known[ready]] = stored.vectors[found[ready]]
            batch.sources[known[ready]] = "precomputed"
        if not ready.all():
            batch.vectors[known[~ready]] = self._embed_known(found[~ready])
        batch.relabel(known, self.artifact.query_id_values[found].tolist())
        wants_seen = batch.exclude_seen[known]
        batch.seen_rows[known[wants_seen]] = found[wants_seen]
        batch.states[known] = STORED  # one dict for them all: a result's state is read only

    def _exported_with_history(
        self, batch: QueryBatch, known: np.ndarray, found: np.ndarray
    ) -> None:
        """Known users in their exported state whose request brings a history: their
        kept inputs, the history features' taken from the request's items instead, and
        those items excluded beside the exported seen ones. The answers of their state
        through ``from_states``, without converting and transforming a stored row."""
        if not len(known):
            return
        histories = [request_history(batch.queries[i], self.timed) for i in known.tolist()]
        failed = {place: h for place, h in enumerate(histories) if isinstance(h, DataError)}
        entries = resolve_recent(
            [[] if place in failed else h for place, h in enumerate(histories)], self.artifact
        )
        failed |= {place: UnknownItemError(items) for place, items in entries.unknown.items()}
        for place, error in failed.items():
            batch.out[known[place]] = error
        keep = np.ones(len(known), dtype=bool)
        keep[list(failed)] = False
        if not keep.any():
            return
        recent = entries.recent(keep, max(self.width, 1))
        known, found = known[keep], found[keep]
        pipeline, codes = self.artifact.pipeline, self.artifact.history_codes
        batch.vectors[known] = self.runtime.vectors(
            {**self._kept_inputs(found[piece]), **pipeline.recent_inputs(recent.take(piece), codes)}
            for piece in _pieces(len(known))
        )
        batch.relabel(known, [batch.queries[i].user for i in known.tolist()])
        wants_seen = batch.exclude_seen[known]
        batch.seen_rows[known[wants_seen]] = found[wants_seen]
        lengths, valid = entries.known_rows(keep)  # every item the request names is seen
        own = np.split(entries.rows[valid], np.cumsum(lengths)[:-1])
        for position, items, wanted in zip(known.tolist(), own, wants_seen.tolist(), strict=True):
            if wanted:
                batch.seen_items[position] = items
        batch.states[known] = self.request_history_state

    def items(self, batch: QueryBatch, positions: np.ndarray) -> None:
        """Items: their own vectors as the query (with ``model.item_bias``, ending with
        a query's 1 instead of the item's bias); the item itself excluded."""
        if not len(positions):
            return
        rows = self.artifact.item_rows([batch.queries[i].item for i in positions])  # (I,)
        known, found = batch.resolve(positions, rows, UnknownItemError, "item"), rows[rows >= 0]
        vectors = self.artifact.item_vectors[found]  # (I, D): every interest, for K > 1
        if self.artifact.model_config.item_bias:  # as a query its last coordinate is 1
            vectors = vectors.copy()
            vectors[:, -1] = 1.0
        batch.vectors[known] = vectors if batch.vectors.ndim == 2 else vectors[:, None]
        batch.self_rows[known] = found
        batch.sources[known] = "item"
        batch.relabel(known, self.artifact.item_id_values[found].tolist())

    def texts(self, batch: QueryBatch, positions: np.ndarray) -> None:
        """Refuses texts this artifact cannot read; ``from_states`` embeds the others, each in
        the query text feature columns (every other column missing)."""
        if not self.text_columns:
            error = DataError(
                "this artifact's query side has no text feature (its query features read "
                f"{', '.join(map(repr, self.query_columns))}); recall users or rows instead"
            )
            batch.out[positions] = error
            return
        for position in positions.tolist():
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
        pieces = [rows[piece] for piece in _pieces(len(rows))]
        if self.known_inputs is None:
            return self.runtime.vectors(self.artifact.known_inputs(piece) for piece in pieces)
        return self.runtime.vectors(self._kept_inputs(piece) for piece in pieces)

    def _kept_inputs(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The kept model inputs of known query ``rows``."""
        at = torch.from_numpy(rows)
        return {name: values[at] for name, values in self.known_inputs.items()}


def _pieces(count: int) -> list[slice]:
    """``count`` rows in slices of at most ``CHUNK_ROWS``, the tower's chunks."""
    return [slice(start, start + CHUNK_ROWS) for start in range(0, count, CHUNK_ROWS)]


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
