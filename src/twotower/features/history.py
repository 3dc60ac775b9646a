"""A query's recent items from the training interactions, as item-vocabulary indices;
and ``Recent``, the same recent items given at request time instead."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twotower.data.dataset import ITEM_IDX, QUERY_IDX, TIMESTAMP
from twotower.data.splits import recency_order
from twotower.errors import ConfigError, DataError
from twotower.features import ragged
from twotower.features.categorical import Vocabulary
from twotower.features.specs import HistoryFeature
from twotower.features.transform import FitContext, Transform, from_numpy_array, to_numpy_array


@dataclasses.dataclass(frozen=True)
class Recent:
    """Each row's most recent interactions, given instead of a fitted history: the
    state of a user at request time (``twotower.serving``), not the training log.

    Attributes:
        rows: (B, L) int64 item rows (rows of the item table whose codes
            ``FeaturePipeline.history_codes`` made), most recent first; -1 where a row
            has fewer than L items.
        times: (B, L) float64 their timestamps in the interaction log's units; NaN
            where unknown or where there is no item.
    """

    rows: np.ndarray
    times: np.ndarray

    @classmethod
    def ragged(cls, lengths: np.ndarray, rows: np.ndarray, times: np.ndarray, width: int) -> Recent:
        """From flat values (each row's items one after another, most recent first),
        each row cut to ``width`` items."""
        lengths = np.asarray(lengths, np.int64)
        if not len(rows):  # no row has an item (cold rows)
            return cls.empty(len(lengths), width)
        padded = ragged.pad(np.asarray(rows, np.int64) + 1, lengths, width, width=width) - 1
        stamps = ragged.pad(np.asarray(times, np.float64) + 0.0, lengths, width, width, np.float64)
        stamps[padded < 0] = np.nan
        return cls(padded, stamps)

    def slice(self, start: int, count: int) -> Recent:
        """Rows ``start`` to ``start + count``."""
        return Recent(self.rows[start : start + count], self.times[start : start + count])

    def take(self, positions: np.ndarray) -> Recent:
        """The rows at ``positions``."""
        return Recent(self.rows[positions], self.times[positions])

    @classmethod
    def empty(cls, count: int, width: int) -> Recent:
        """``count`` rows without an item."""
        return cls(np.full((count, width), -1, np.int64), np.full((count, width), np.nan))


@dataclasses.dataclass(frozen=True)
class RecentLists:
    """Every known query's most recent interactions, ragged: query q's are entries
    ``indptr[q]:indptr[q + 1]``, most recent first, at most the width they were cut to.

    Attributes:
        indptr: (Q + 1,) int64 where each query's entries start.
        rows: (nnz,) int64 their item rows.
        times: (nnz,) float64 their timestamps; NaN where the log has none.
    """

    indptr: np.ndarray
    rows: np.ndarray
    times: np.ndarray

    @classmethod
    def from_log(
        cls,
        query: np.ndarray,
        item: np.ndarray,
        timestamps: np.ndarray | None,
        num_queries: int,
        width: int,
    ) -> RecentLists:
        """From an interaction log's query and item indices: each query's ``width``
        latest, by the rule the splits and history features share (``recency_order``)."""
        order = recency_order(query, timestamps)[::-1]  # query descending, most recent first
        order = order[np.argsort(query[order], kind="stable")]
        owners = query[order]
        counts = np.bincount(owners, minlength=num_queries)
        rank = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
        kept = order[rank < width]
        lengths = np.minimum(counts, width)
        times = np.full(len(kept), np.nan) if timestamps is None else timestamps[kept]
        return cls(
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            item[kept].astype(np.int64),
            np.asarray(times, np.float64),
        )

    @classmethod
    def from_lists(cls, rows: np.ndarray, lengths: np.ndarray, width: int) -> RecentLists:
        """From each query's item rows, most recent first, row after row (no timestamps)."""
        lengths = np.asarray(lengths, np.int64)
        kept = np.minimum(lengths, width)
        starts = np.cumsum(lengths) - lengths
        picked = (
            np.repeat(starts, kept)
            + np.arange(kept.sum())
            - np.repeat(np.cumsum(kept) - kept, kept)
        )
        return cls(
            np.concatenate([[0], np.cumsum(kept)]).astype(np.int64),
            np.asarray(rows, np.int64)[picked],
            np.full(len(picked), np.nan),
        )

    @property
    def lengths(self) -> np.ndarray:
        """(Q,) how many entries each query has."""
        return np.diff(self.indptr)

    def recent(self, queries: np.ndarray, width: int) -> Recent:
        """The padded ``Recent`` of the queries at ``queries``."""
        starts, lengths = self.indptr[queries], self.lengths[queries]
        picked = (
            np.repeat(starts, lengths)
            + np.arange(lengths.sum())
            - np.repeat(np.cumsum(lengths) - lengths, lengths)
        )
        return Recent.ragged(lengths, self.rows[picked], self.times[picked], width)


class HistoryTransform(Transform):
    """A query key -> (rows, max_len) int64 item indices, most recent first, 0-padded.

    Fitted on training interactions only, so validation and test items never
    appear. Recency follows ``recency_order``, the rule the splits use. The
    indices are those of the item-id feature named by ``item_feature``, whose
    embedding table the towers share.
    A query with no training interaction (or unseen) gets an all-padding row.
    With ``time_buckets``, ``times`` gives the items' timestamps alike (float64).

    Fitted from a stream (``fit_rows``), there is no state: each row carries its own
    history as a list column named after the feature (item ids, most recent first, as
    ``twotower data build`` writes it; a null item is a blank), and ``transform_lists``
    maps it through the item-id feature's vocabulary.
    """

    spec: HistoryFeature

    def __init__(self, spec: HistoryFeature) -> None:
        super().__init__(spec)
        self.keys = Vocabulary()
        self.items = np.zeros((0, spec.max_len), np.int64)
        self.item_times = np.zeros((0, spec.max_len), np.float64)  # with time_buckets
        self.from_rows = False  # the rows carry the histories (a stream)

    def fit_rows(self) -> None:
        """Fits for rows that carry their histories (a stream): nothing to learn."""
        if self.spec.time_buckets:
            raise ConfigError(
                f"history feature {self.spec.name!r}: time_buckets need each item's "
                "timestamp, which a history list column does not carry; set time_buckets: 0"
            )
        self.from_rows = True

    def transform_lists(self, lists: pa.Array, item_feature: Transform) -> np.ndarray:
        """(rows, max_len) int64 item indices of list-column histories (item ids, most
        recent first), looked up in ``item_feature``, the item-id feature's transform;
        a null item is a blank (0), as a masked target is in memory."""
        flat, lengths = ragged.list_parts(lists)
        codes = np.asarray(item_feature.transform(flat), dtype=np.int64)
        codes[pc.is_null(flat).to_numpy(zero_copy_only=False)] = 0
        width = self.spec.max_len
        return ragged.pad(codes, lengths, width, width=width)

    def transform_recent(
        self, recent: Recent, item_codes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rows, max_len) int64 item indices and float64 timestamps of request-time
        histories: each item row's code in ``item_codes`` (the item-id feature's code
        of each item row), the first ``max_len`` items kept; 0 where there is none."""
        rows = recent.rows[:, : self.spec.max_len]
        width = rows.shape[1]
        there = rows >= 0
        items = np.zeros((len(rows), self.spec.max_len), np.int64)
        times = np.zeros((len(rows), self.spec.max_len), np.float64)
        items[:, :width] = np.where(there, item_codes[np.where(there, rows, 0)], 0)
        times[:, :width] = np.where(there, np.nan_to_num(recent.times[:, : self.spec.max_len]), 0)
        return items, times

    def fit(self, values: pa.Array, context: FitContext) -> None:
        if context.train is None or context.query_keys is None:
            raise DataError(f"history feature {self.spec.name!r} needs the training interactions")
        codes = context.item_codes[self.spec.item_feature]
        query = context.train.column(QUERY_IDX).to_numpy()
        timestamps = None
        if TIMESTAMP in context.train.column_names:
            timestamps = context.train.column(TIMESTAMP).to_numpy()
        elif self.spec.time_buckets:
            raise DataError(
                f"history feature {self.spec.name!r} has time_buckets, but the interactions "
                "have no timestamp column; set time_buckets: 0"
            )
        order = recency_order(query, timestamps)[::-1]  # query descending, most recent first
        order = order[np.argsort(query[order], kind="stable")]
        query_sorted = query[order]
        owners, lengths = np.unique(query_sorted, return_counts=True)
        items = codes[context.train.column(ITEM_IDX).to_numpy()[order]]
        self.keys = Vocabulary(pc.take(context.query_keys, pa.array(owners)))
        self.items = ragged.pad(items, lengths, self.spec.max_len, width=self.spec.max_len)
        if self.spec.time_buckets:
            times = timestamps[order].astype(np.float64)
            width = self.spec.max_len
            self.item_times = ragged.pad(times, lengths, width, width, dtype=np.float64)

    def transform(self, values: pa.Array) -> np.ndarray:
        row = self.keys.lookup(values) - 2  # vocabulary indices start at 2
        out = np.zeros((len(row), self.spec.max_len), np.int64)  # unknown: all padding
        known = row >= 0
        out[known] = self.items[row[known]]
        return out

    def times(self, values: pa.Array) -> np.ndarray:
        """(rows, max_len) float64 timestamps of ``transform``'s items (0 with none)."""
        row = self.keys.lookup(values) - 2
        out = np.zeros((len(row), self.spec.max_len), np.float64)
        known = row >= 0
        out[known] = self.item_times[row[known]]
        return out

    @property
    def size(self) -> int:
        return self.spec.max_len

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {"keys": to_numpy_array(self.keys.values), "items": self.items}
        if self.spec.time_buckets:
            arrays["times"] = self.item_times
        return {"from_rows": self.from_rows}, arrays

    def load_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.from_rows = bool(meta.get("from_rows", False))
        self.keys = Vocabulary(from_numpy_array(arrays["keys"]))
        self.items = arrays["items"]
        if self.spec.time_buckets:
            self.item_times = arrays["times"]
