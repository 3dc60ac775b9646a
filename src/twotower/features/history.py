"""A query's recent items from the training interactions, as item-vocabulary indices."""

from __future__ import annotations

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
