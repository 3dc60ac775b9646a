"""Retrieval from a loaded artifact: known users, new users' rows, free text, similar items.

Framework-free: an HTTP app only turns requests into these calls and results into
JSON (``dataclasses.asdict(result)``). Every call reads the artifact and never
changes it, so one ``Retriever`` may serve many threads at once.

    raw query rows -> pipeline.transform -> query tower -> (B, D) -> index.search
        excluding each known user's logged items (``exclude_seen``) and ``exclude_items``

Scores are inner products of unit vectors (cosines), without the temperature.
``exclude_items`` ids that are not in the item table are ignored: such an item can
never be returned anyway. ``k`` is at most the corpus size; a result holds fewer
than k items when exclusions leave fewer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from twotower.errors import DataError
from twotower.features.specs import TextFeature
from twotower.serving.artifact import Artifact
from twotower.towers.model import embed_rows


@dataclasses.dataclass(frozen=True)
class Result:
    """One query's items, best first.

    Attributes:
        query: the user id, the text, or (for ``recall_rows``) the row's query key or
            its position when the rows have no key column.
        items: item ids as in the item table's key column (int or str).
        scores: their scores (cosines), same order.
    """

    query: Any
    items: list[Any]
    scores: list[float]


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


class Retriever:
    """Top-k items for users, feature rows, texts or items, from one artifact."""

    def __init__(self, artifact: Artifact) -> None:
        self.artifact = artifact
        specs = artifact.pipeline.config.query
        self.query_columns = list(dict.fromkeys(spec.column for spec in specs))
        self.text_columns = [spec.column for spec in specs if isinstance(spec, TextFeature)]

    @classmethod
    def load(cls, folder: Path) -> Retriever:
        """A retriever over the artifact in ``folder`` (verified while loading)."""
        return cls(Artifact.load(folder))

    @property
    def num_items(self) -> int:
        return self.artifact.index.num_items

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
            k: items per user, 1..N.
            exclude_seen: leave out the items each user already interacted with.
            exclude_items: item ids left out for every user.

        Raises:
            UnknownQueryError: some ids are not known queries (all of them are named).
        """
        self._check_k(k)
        user_ids = list(user_ids)
        rows = self.artifact.query_rows(user_ids)  # (B,)
        unknown = np.flatnonzero(rows < 0)
        if len(unknown):
            raise UnknownQueryError([user_ids[i] for i in unknown])
        table = self.artifact.queries.take(pa.array(rows))
        seen = self.artifact.seen[rows] if exclude_seen else None
        return self._recall(table, user_ids, k, seen, exclude_items)

    def recall_rows(
        self, rows: pa.Table, k: int, exclude_items: Sequence[Any] | None = None
    ) -> list[Result]:
        """Top-k items for raw query-side feature rows, e.g. of users not in the artifact.

        Args:
            rows: a table with every column the query features read; a user the
                artifact does not know has an empty history and an unseen id.
            k: items per row, 1..N.
            exclude_items: item ids left out for every row.

        Raises:
            DataError: ``rows`` lacks columns the query features read (all named).
        """
        self._check_k(k)
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
        return self._recall(rows, labels, k, None, exclude_items)

    def recall_text(
        self, texts: Sequence[str], k: int, exclude_items: Sequence[Any] | None = None
    ) -> list[Result]:
        """Top-k items for free-text queries (artifacts whose query side reads text).

        Each text fills the column(s) of the query text features; every other query
        column is empty (missing values, as for a query never seen).

        Raises:
            DataError: the artifact's query side has no text feature.
        """
        if not self.text_columns:
            raise DataError(
                "this artifact's query side has no text feature (its query features read "
                f"{', '.join(map(repr, self.query_columns))}); recall users or rows instead"
            )
        self._check_k(k)
        texts = list(texts)
        schema = self.artifact.queries.schema
        columns = {
            column: pa.array(texts, pa.string())
            if column in self.text_columns
            else pa.nulls(len(texts), _column_type(schema, column))
            for column in self.query_columns
        }
        return self._recall(pa.table(columns), texts, k, None, exclude_items)

    def similar_items(self, item_id: Any, k: int) -> Result:
        """The k items whose vectors have the highest inner product with this item's.

        The item itself is never returned.

        Raises:
            UnknownItemError: ``item_id`` is not in the item table.
        """
        self._check_k(k)
        row = self.artifact.item_rows([item_id])  # (1,)
        if row[0] < 0:
            raise UnknownItemError([item_id])
        itself = sp.csr_matrix((np.ones(1, np.float32), ([0], row)), shape=(1, self.num_items))
        ids, scores = self.artifact.index.search(self.artifact.item_vectors[row], k, itself)
        return self._results([item_id], ids, scores)[0]

    def _recall(
        self,
        table: pa.Table,
        labels: list[Any],
        k: int,
        exclude: sp.csr_matrix | None,
        exclude_items: Sequence[Any] | None,
    ) -> list[Result]:
        if table.num_rows == 0:
            return []
        tower = self.artifact.query_tower
        vectors = embed_rows(tower, self.artifact.pipeline, "query", table).cpu().numpy()  # (B, D)
        exclude = self._with_items(exclude, exclude_items, len(labels))
        ids, scores = self.artifact.index.search(vectors, k, exclude)
        return self._results(labels, ids, scores)

    def _with_items(
        self, exclude: sp.csr_matrix | None, exclude_items: Sequence[Any] | None, B: int
    ) -> sp.csr_matrix | None:
        """(B, N) exclusions: ``exclude`` plus the columns of ``exclude_items`` in every row."""
        if not exclude_items:
            return exclude
        cols = self.artifact.item_rows(list(exclude_items))
        cols = np.unique(cols[cols >= 0])  # unknown ids can never be returned anyway
        rows = np.repeat(np.arange(B), len(cols))
        ones = np.ones(len(rows), np.float32)
        extra = sp.csr_matrix((ones, (rows, np.tile(cols, B))), shape=(B, self.num_items))
        return extra if exclude is None else (exclude + extra).tocsr()

    def _results(self, labels: list[Any], ids: np.ndarray, scores: np.ndarray) -> list[Result]:
        """(B, k) item rows and scores -> one Result per label, padding left out."""
        kept = ids >= 0
        items = pc.take(self.artifact.item_ids, pa.array(ids[kept])).to_pylist()
        values = scores[kept].tolist()
        ends = np.cumsum(kept.sum(axis=1)).tolist()
        starts = [0, *ends[:-1]]
        return [
            Result(label, items[s:e], values[s:e])
            for label, s, e in zip(labels, starts, ends, strict=True)
        ]

    def _check_k(self, k: int) -> None:
        if (
            isinstance(k, bool)
            or not isinstance(k, (int, np.integer))
            or not (1 <= k <= self.num_items)
        ):
            raise ValueError(f"k must be an integer from 1 to {self.num_items}, got {k!r}")


def _column_type(schema: pa.Schema, column: str) -> pa.DataType:
    index = schema.get_field_index(column)
    return schema.field(index).type if index >= 0 else pa.null()
