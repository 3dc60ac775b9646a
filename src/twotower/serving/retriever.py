"""Retrieval from a loaded artifact: known users, new users' rows, free text, similar items.

Framework-free: an HTTP app only turns requests into ``Query`` objects and results
into JSON (``dataclasses.asdict(result)``). Every call reads the artifact and never
changes it, so one ``Retriever`` may serve many threads at once.

``retrieve`` answers any mix of queries together, which is what lets a server embed
concurrent requests in one pass:

    users    -> their rows of queries.parquet ┐
    features -> a table of raw rows           ├ pipeline.transform -> query tower ┐
    texts    -> the text feature columns      ┘                                   ├ (B, D)
    items    -> their item vectors ───────────────────────────────────────────────┘
        -> one index.search with k = the largest k, excluding per query: the user's
           logged items (``exclude_seen``), ``exclude_items``, and an item itself

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

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
import torch

from twotower.errors import DataError
from twotower.features.specs import TextFeature
from twotower.serving.artifact import Artifact
from twotower.serving.query_vectors import QueryVectors, read_query_vectors
from twotower.serving.runtime import tower_runtime

SOURCES = ("user", "features", "text", "item")
# The most bytes the known users' model inputs may take in memory (Retriever).
INPUT_BUDGET = 1 << 30
CHUNK_ROWS = 4096  # queries through the tower at once


@dataclasses.dataclass(frozen=True)
class Query:
    """One retrieval, from exactly one of a known user, a raw row, a text or an item.

    Attributes:
        user: a known query key; its feature row and logged history come from the
            artifact.
        features: a raw query-side row ``{column: value}``, e.g. of a user the artifact
            does not know (cold start); columns left out are missing values.
        text: free text for the query side's text features (search).
        item: an item key: the items nearest to its vector (the item itself excluded).
        k: how many items to return (>= 1; above the corpus size, the whole corpus).
        exclude_seen: for a known user, leave out the items they interacted with.
        exclude_items: item keys left out of this query's result.
    """

    user: Any = None
    features: Mapping[str, Any] | None = None
    text: str | None = None
    item: Any = None
    k: int = 10
    exclude_seen: bool = True
    exclude_items: Sequence[Any] = ()

    @property
    def source(self) -> str:
        """Which of ``user``, ``features``, ``text``, ``item`` this query starts from."""
        given = [name for name in SOURCES if getattr(self, name) is not None]
        if len(given) != 1:
            raise DataError(
                f"a query needs exactly one of {', '.join(SOURCES)}; got "
                f"{', '.join(given) if given else 'none'}"
            )
        return given[0]


@dataclasses.dataclass(frozen=True)
class Result:
    """One query's items, best first.

    Attributes:
        query: the user id, the text, the item id, or for a raw row its query key
            (``retrieve``: None when it has none; ``recall_rows``: its position).
        items: item ids as in the item table's key column (int or str).
        scores: their scores (cosines), same order.
        interests: for a multi-interest query tower, which of the query's interest
            vectors (0..K-1) found each item, same order; None otherwise.
        vector: where the query vector came from: ``tower`` (computed now),
            ``precomputed`` (a known user's row of the query vectors file) or ``item``
            (an item's own vector).
    """

    query: Any
    items: list[Any]
    scores: list[float]
    interests: list[int] | None = None
    vector: str = "tower"


class UnknownQueryError(DataError):
    """Query (user) ids that the artifact does not know; ``ids`` lists them."""

    def __init__(self, ids: Sequence[Any]) -> None:
        self.ids = list(ids)
        shown = ", ".join(repr(i) for i in self.ids[:10])
        more = f" and {len(self.ids) - 10} more" if len(self.ids) > 10 else ""
        super().__init__(
            f"unknown query id(s): {shown}{more}; recall a new user by its feature rows instead"
        )


class UnknownItemError(DataError):
    """Item ids that are not in the artifact's item table; ``ids`` lists them."""

    def __init__(self, ids: Sequence[Any]) -> None:
        self.ids = list(ids)
        super().__init__(f"unknown item id(s): {', '.join(repr(i) for i in self.ids[:10])}")


class _Batch:
    """The working state of one ``retrieve`` call, one slot per query."""

    def __init__(self, queries: list[Query], dim: int, interests: int) -> None:
        B = len(queries)
        self.queries = queries
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
            Not kept when ``query_vectors`` holds every known user.
        runtime: what runs the query tower (``twotower.serving.runtime``): ``torch``, or
            ``onnx`` for the ONNX graph of an artifact exported with it.
    """

    def __init__(
        self,
        artifact: Artifact,
        query_vectors: QueryVectors | None = None,
        input_budget: int = INPUT_BUDGET,
        runtime: str = "torch",
    ) -> None:
        self.artifact = artifact
        self.runtime = tower_runtime(artifact, runtime)
        self.query_vectors = query_vectors
        every_user_stored = query_vectors is not None and bool(query_vectors.present.all())
        self.known_inputs = None if every_user_stored else _known_inputs(artifact, input_budget)
        # keys by row as numpy (int64, float64 or object): answers index them
        self.item_id_values = artifact.item_ids.to_numpy(zero_copy_only=False)
        self.query_id_values = artifact.queries.column(artifact.query_key).to_numpy()
        specs = artifact.pipeline.config.query
        transforms = artifact.pipeline.transforms["query"]
        # a history built out of core is a list column of its own, named after it
        self.query_columns = list(
            dict.fromkeys(
                spec.name if getattr(transforms[spec.name], "from_rows", False) else spec.column
                for spec in specs
            )
        )
        self.text_columns = [spec.column for spec in specs if isinstance(spec, TextFeature)]
        artifact.query_keys, artifact.item_keys  # noqa: B018 (built now, not on a request)

    @classmethod
    def load(
        cls, folder: Path, query_vectors: Path | None = None, runtime: str = "torch"
    ) -> Retriever:
        """A retriever over the artifact in ``folder`` (verified while loading), with the
        precomputed vectors of the file ``query_vectors`` if given (checked against it),
        its query tower run by ``runtime``."""
        artifact = Artifact.load(folder)
        vectors = None if query_vectors is None else read_query_vectors(query_vectors, artifact)
        return cls(artifact, vectors, runtime=runtime)

    @property
    def num_items(self) -> int:
        return self.artifact.index.num_items

    @property
    def interests(self) -> int:
        """K, the vectors the query tower gives each query (1 unless multi-interest)."""
        return self.artifact.query_tower.interests

    def retrieve(self, queries: Sequence[Query]) -> list[Result | DataError]:
        """Answers any mix of queries in one tower pass per source and one index search.

        Returns:
            One entry per query, in order: its ``Result``, or the ``DataError`` that
            query alone caused (an unknown user or item, a bad feature value, k < 1,
            text for an artifact without a text feature). One bad query never
            fails the others.
        """
        batch = _Batch(list(queries), self.artifact.index.dim, self.interests)
        groups: dict[str, list[int]] = {name: [] for name in SOURCES}
        for position, query in enumerate(batch.queries):
            try:
                _check_k(query.k)
                groups[query.source].append(position)
            except DataError as err:
                batch.out[position] = err
        self._embed_users(batch, groups["user"])
        self._embed_items(batch, groups["item"])
        self._embed_features(batch, groups["features"])
        self._embed_texts(batch, groups["text"])
        live = np.array([i for i, o in enumerate(batch.out) if o is None], dtype=np.int64)
        if len(live):
            ks = np.array([min(batch.queries[i].k, self.num_items) for i in live])
            exclude = self._exclusions(
                [batch.queries[i].exclude_items for i in live],
                batch.seen_rows[live],
                batch.self_rows[live],
            )
            labels = [batch.labels[i] for i in live]
            results = self._search(batch.vectors[live], labels, ks, exclude)
            for position, result in zip(live, results, strict=True):
                item_query = batch.self_rows[position] >= 0
                batch.out[position] = dataclasses.replace(
                    result,
                    interests=None if item_query else result.interests,
                    vector=batch.sources[position],
                )
        return batch.out  # type: ignore[return-value]

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
        _check_k(k)
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

        Args:
            rows: a table with every column the query features read; a user the
                artifact does not know has an empty history and an unseen id.
            k: items per row (>= 1).
            exclude_items: item ids left out for every row.

        Raises:
            DataError: ``rows`` lacks columns the query features read (all named).
        """
        _check_k(k)
        missing = [c for c in self.query_columns if c not in rows.column_names]
        if missing:
            raise DataError(
                f"the query rows lack column(s) {', '.join(map(repr, missing))}, which the "
                f"query features read; they have {', '.join(map(repr, rows.column_names))}"
            )
        if rows.num_rows == 0:
            return []
        key = self.artifact.query_key
        labels = (
            rows.column(key).to_pylist() if key in rows.column_names else list(range(rows.num_rows))
        )
        vectors = self._embed(rows)
        none = np.full(rows.num_rows, -1)
        exclude = self._exclusions([tuple(exclude_items or ())] * rows.num_rows, none, none)
        ks = np.full(rows.num_rows, min(k, self.num_items))
        return self._search(vectors, labels, ks, exclude)

    def recall_text(
        self, texts: Sequence[str], k: int, exclude_items: Sequence[Any] | None = None
    ) -> list[Result]:
        """Top-k items for free-text queries (artifacts whose query side reads text).

        Each text fills the column(s) of the query text features; every other query
        column is empty (missing values, as for a query never seen).

        Raises:
            DataError: the artifact's query side has no text feature.
        """
        _check_k(k)
        extra = tuple(exclude_items or ())
        return _raise_first(self.retrieve([Query(text=t, k=k, exclude_items=extra) for t in texts]))

    def similar_items(self, item_id: Any, k: int) -> Result:
        """The k items whose vectors have the highest inner product with this item's
        (with ``model.item_bias``: cosine plus the other item's bias coordinate).

        The item itself is never returned.

        Raises:
            UnknownItemError: ``item_id`` is not in the item table.
        """
        _check_k(k)
        return _raise_first(self.retrieve([Query(item=item_id, k=k)]))[0]

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

    def _embed_users(self, batch: _Batch, positions: list[int]) -> None:
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

    def _embed_items(self, batch: _Batch, positions: list[int]) -> None:
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
        batch.vectors[known] = vectors if self.interests == 1 else vectors[:, None]
        batch.self_rows[known] = found
        for position in known.tolist():
            batch.sources[position] = "item"
        batch.relabel(known, self.item_id_values[found].tolist())

    def _embed_features(self, batch: _Batch, positions: list[int]) -> None:
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
        columns, errors = _feature_columns(rows, self.query_columns, self.artifact.queries.schema)
        for index, error in errors.items():
            batch.out[good[index]] = error
        places = [p for index, p in enumerate(good) if index not in errors]
        if places:
            kept = pa.array([index not in errors for index in range(len(good))])
            table = pa.table({name: column.filter(kept) for name, column in columns.items()})
            batch.vectors[places] = self._embed(table)
            key = self.artifact.query_key
            batch.relabel(np.array(places), [batch.queries[i].features.get(key) for i in places])

    def _embed_texts(self, batch: _Batch, positions: list[int]) -> None:
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
            else pa.nulls(len(texts), _column_type(schema, column))
            for column in self.query_columns
        }
        batch.vectors[positions] = self._embed(pa.table(columns))
        batch.relabel(np.array(positions), [batch.queries[i].text for i in positions])

    def _exclusions(
        self, exclude_items: list[Sequence[Any]], seen_rows: np.ndarray, self_rows: np.ndarray
    ) -> sp.csr_matrix | None:
        """(B, N): each query's seen items, its ``exclude_items`` and an item itself.

        Built from (row, column) pairs, in time proportional to the excluded items:
        nothing here walks the N columns.
        """
        B, N = len(exclude_items), self.num_items
        lengths = [len(items) for items in exclude_items]
        named = [item for items in exclude_items for item in items]
        seen_at, seen_cols = _gather_rows(self.artifact.seen, seen_rows)
        itself = np.flatnonzero(self_rows >= 0)
        rows = np.concatenate([seen_at, np.repeat(np.arange(B), lengths), itself])
        cols = np.concatenate([seen_cols, self.artifact.item_rows(named), self_rows[itself]])
        known = cols >= 0  # unknown ids can never be returned anyway
        if not known.any():
            return None
        rows, cols = rows[known], cols[known]
        order = np.argsort(rows, kind="stable")  # CSR arrays directly: no COO pass
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=B))])
        ones = np.ones(len(cols), np.float32)
        return sp.csr_matrix((ones, cols[order], indptr), shape=(B, N))  # repeats allowed

    def _search(
        self,
        vectors: np.ndarray,
        labels: list[Any],
        ks: np.ndarray,
        exclude: sp.csr_matrix | None,
    ) -> list[Result]:
        """One index search of (B, D) or (B, K, D) query vectors for the largest of ``ks``,
        then one Result per label: its own k, padding left out."""
        index, k = self.artifact.index, int(ks.max())
        if vectors.ndim == 3:
            ids, scores, interests = index.search_interests(vectors, k, exclude)
        else:
            (ids, scores), interests = index.search(vectors, k, exclude), None
        kept = (ids >= 0) & (np.arange(ids.shape[1]) < ks[:, None])
        items = self.item_id_values[ids[kept]].tolist()
        values = scores[kept].tolist()
        found = interests[kept].tolist() if interests is not None else None
        ends = np.cumsum(kept.sum(axis=1)).tolist()
        starts = [0, *ends[:-1]]
        return [
            Result(label, items[s:e], values[s:e], found[s:e] if found is not None else None)
            for label, s, e in zip(labels, starts, ends, strict=True)
        ]


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


def _check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise DataError(f"k must be an integer >= 1, got {k!r}")


def _encodes(text: str) -> bool:
    """Whether ``text`` is valid Unicode (JSON can carry lone surrogates, which are not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _raise_first(answers: list[Result | DataError]) -> list[Result]:
    for answer in answers:
        if isinstance(answer, DataError):
            raise answer
    return answers  # type: ignore[return-value]


def _feature_columns(
    rows: list[Mapping[str, Any]], columns: list[str], schema: pa.Schema
) -> tuple[dict[str, pa.Array], dict[int, DataError]]:
    """Raw rows -> one array per query column of the artifact's type, and bad rows' errors.

    A column a row leaves out is null there (a missing value). Values convert only
    where nothing is lost (25.5 is not an integer); a value that does not convert is
    that row's error, naming the feature, the value and the expected type.
    """
    arrays: dict[str, pa.Array] = {}
    errors: dict[int, DataError] = {}
    for column in columns:
        target = _column_type(schema, column)
        values = [row.get(column) for row in rows]
        try:
            arrays[column] = _convert(values, target)
            continue
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            pass
        pieces = []
        for index, value in enumerate(values):  # the slow path, only when some value is bad
            try:
                pieces.append(_convert([value], target))
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                pieces.append(pa.nulls(1, target))
                errors.setdefault(
                    index, DataError(f"feature {column!r}: {value!r} is not a valid {target}")
                )
        arrays[column] = pa.concat_arrays(pieces) if pieces else pa.nulls(0, target)
    return arrays, errors


def _convert(values: list[Any], target: pa.DataType) -> pa.Array:
    """``values`` as an array of ``target``, refusing lossy casts (25.5 -> int64)."""
    if pa.types.is_null(target):
        return pa.nulls(len(values))
    inferred = pa.array(values)
    return inferred if inferred.type == target else pc.cast(inferred, target, safe=True)


def _column_type(schema: pa.Schema, column: str) -> pa.DataType:
    index = schema.get_field_index(column)
    return schema.field(index).type if index >= 0 else pa.null()
