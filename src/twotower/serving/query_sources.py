"""Query vectors from each source a ``Query`` may start from, for one batch at a time;
and what each query of the batch leaves out of its search.

    users    -> precomputed vectors, or their kept (or transformed) inputs -> tower
    features -> raw rows converted to the stored types (features/rows.py) -> tower
    texts    -> the query text feature columns, every other column missing -> tower
    items    -> their own item vectors

Each source fills its queries' slots of a ``QueryBatch``: the vector, the label its
result carries and what its search leaves out; a query that fails gets its error in
its slot instead, and never fails the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import torch

from twotower.errors import DataError
from twotower.features.rows import column_type, rows_table
from twotower.features.specs import TextFeature
from twotower.serving.artifact import Artifact
from twotower.serving.query import Query, Result, UnknownItemError, UnknownQueryError
from twotower.serving.query_vectors import QueryVectors
from twotower.serving.runtime import TowerRuntime

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
        self.self_rows = np.full(B, -1, dtype=np.int64)  # item rows excluded as themselves
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

        Built from (row, column) pairs, in time proportional to the excluded items:
        nothing here walks the N columns.
        """
        P, N = len(positions), artifact.index.num_items
        excluded = [self.queries[i].exclude_items for i in positions]
        lengths = [len(items) for items in excluded]
        named = [item for items in excluded for item in items]
        seen_at, seen_cols = _gather_rows(artifact.seen, self.seen_rows[positions])
        self_rows = self.self_rows[positions]
        itself = np.flatnonzero(self_rows >= 0)
        rows = np.concatenate([seen_at, np.repeat(np.arange(P), lengths), itself])
        cols = np.concatenate([seen_cols, artifact.item_rows(named), self_rows[itself]])
        known = cols >= 0  # unknown ids can never be returned anyway
        if not known.any():
            return None
        rows, cols = rows[known], cols[known]
        order = np.argsort(rows, kind="stable")  # CSR arrays directly: no COO pass
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=P))])
        ones = np.ones(len(cols), np.float32)
        return sp.csr_matrix((ones, cols[order], indptr), shape=(P, N))  # repeats allowed


class QuerySources:
    """Fills a ``QueryBatch``'s vectors from each query's source, over one artifact.

    Args:
        artifact: the loaded artifact.
        runtime: what runs its query tower.
        query_vectors: known users' precomputed vectors, or None.
        input_budget: the most bytes the known users' kept model inputs may take
            (``Retriever``'s arguments say more).
    """

    def __init__(
        self,
        artifact: Artifact,
        runtime: TowerRuntime,
        query_vectors: QueryVectors | None,
        input_budget: int,
    ) -> None:
        self.artifact = artifact
        self.runtime = runtime
        self.query_vectors = query_vectors
        every_user_stored = query_vectors is not None and bool(query_vectors.present.all())
        self.known_inputs = None if every_user_stored else _known_inputs(artifact, input_budget)
        # keys by row as numpy (int64, float64 or object): answers index them
        self.item_id_values = artifact.item_ids.to_numpy(zero_copy_only=False)
        self.query_id_values = artifact.queries.column(artifact.query_key).to_numpy()
        self.query_columns = artifact.pipeline.input_columns("query")
        self.text_columns = [
            spec.column for spec in artifact.pipeline.config.query if isinstance(spec, TextFeature)
        ]

    def embed(self, batch: QueryBatch, groups: dict[str, list[int]]) -> None:
        """Fills the vectors (or errors) of the positions of each source in ``groups``."""
        self.users(batch, groups["user"])
        self.items(batch, groups["item"])
        self.features(batch, groups["features"])
        self.texts(batch, groups["text"])

    def users(self, batch: QueryBatch, positions: list[int]) -> None:
        """Known users: their stored rows through the tower; their seen items noted."""
        if not positions:
            return
        rows = self.artifact.query_rows([batch.queries[i].user for i in positions])  # (U,)
        known, found = batch.resolve(positions, rows, UnknownQueryError, "user"), rows[rows >= 0]
        if len(known):
            stored = self.query_vectors
            ready = stored.present[found] if stored is not None else np.zeros(len(found), bool)
            if ready.any():  # precomputed: no tower pass
                batch.vectors[known[ready]] = stored.vectors[found[ready]]
                for position in known[ready].tolist():
                    batch.sources[position] = "precomputed"
            if not ready.all():
                batch.vectors[known[~ready]] = self._embed_known(found[~ready])
            batch.relabel(known, self.query_id_values[found].tolist())
            wants_seen = np.array([batch.queries[i].exclude_seen for i in known], dtype=bool)
            batch.seen_rows[known[wants_seen]] = found[wants_seen]

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
        batch.relabel(known, self.item_id_values[found].tolist())

    def features(self, batch: QueryBatch, positions: list[int]) -> None:
        """Raw rows: converted to the artifact's column types, then through the tower."""
        if not positions:
            return
        good = []
        for position in positions:
            unknown = sorted(set(batch.queries[position].features) - set(self.query_columns))
            if unknown:
                batch.out[position] = DataError(
                    f"unknown feature(s) {', '.join(map(repr, unknown))}; the query side reads "
                    f"{', '.join(map(repr, self.query_columns))}"
                )
            else:
                good.append(position)
        rows = [batch.queries[i].features for i in good]
        table, errors = rows_table(rows, self.query_columns, self.artifact.queries.schema)
        for index, error in errors.items():
            batch.out[good[index]] = error
        places = [p for index, p in enumerate(good) if index not in errors]
        if places:
            batch.vectors[places] = self._embed(table)
            key = self.artifact.query_key
            batch.relabel(np.array(places), [batch.queries[i].features.get(key) for i in places])

    def texts(self, batch: QueryBatch, positions: list[int]) -> None:
        """Texts: in the query text feature columns, every other column missing."""
        if not positions:
            return
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
        positions = [p for p in positions if batch.out[p] is None]
        if not positions:
            return
        texts = pa.array([batch.queries[i].text for i in positions], pa.string())
        schema = self.artifact.queries.schema
        columns = {
            column: texts
            if column in self.text_columns
            else pa.nulls(len(texts), column_type(schema, column))
            for column in self.query_columns
        }
        batch.vectors[positions] = self._embed(pa.table(columns))
        batch.relabel(np.array(positions), [batch.queries[i].text for i in positions])

    def _embed(self, table: pa.Table) -> np.ndarray:
        """(rows, D) query vectors of raw query rows."""
        chunks = self.artifact.pipeline.transform_chunks("query", table, CHUNK_ROWS)
        return self.runtime.vectors(chunks)

    def _embed_known(self, rows: np.ndarray) -> np.ndarray:
        """(U, D) vectors of known query rows: their inputs gathered (or transformed
        now, when they were not kept), through the tower."""
        inputs = self.known_inputs
        if inputs is None:
            return self._embed(self.artifact.queries.take(pa.array(rows)))
        pieces = (
            torch.from_numpy(rows[s : s + CHUNK_ROWS]) for s in range(0, len(rows), CHUNK_ROWS)
        )
        chunks = ({name: values[piece] for name, values in inputs.items()} for piece in pieces)
        return self.runtime.vectors(chunks)


def _known_inputs(artifact: Artifact, budget: int, chunk: int = CHUNK_ROWS) -> dict | None:
    """Every known query row's model inputs, transformed once (each tensor padded to
    its widest chunk), or None when they would take more than ``budget`` bytes."""
    queries = artifact.queries
    chunks = artifact.pipeline.transform_chunks("query", queries, chunk)
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


def _gather_rows(matrix: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions, columns) of the nonzeros of ``matrix[rows[b]]`` for every b with rows[b] >= 0."""
    positions = np.flatnonzero(rows >= 0)
    starts = matrix.indptr[rows[positions]]
    lengths = matrix.indptr[rows[positions] + 1] - starts
    offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)  # (nnz,) start - before
    picked = offsets + np.arange(lengths.sum())
    return np.repeat(positions, lengths), matrix.indices[picked].astype(np.int64)


def _encodes(text: str) -> bool:
    """Whether ``text`` is valid Unicode (JSON can carry lone surrogates, which are not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
