"""Fitting feature state from a stream of batches, in bounded memory.

Each feature keeps a summary that batches update and that is then turned into the
same fitted transform ``FeaturePipeline.fit`` makes from a whole table:

    id, onehot, multihot   value counts. Exact while the distinct values number at
                           most ``max_distinct``; past that, a Misra-Gries summary
                           of that many counters (approximate: each count is low by
                           at most total / (max_distinct + 1), and every value seen
                           more often than that is kept)
    hashed id, text        nothing to fit (hashing)
    dense standardize/log  count, mean and variance, exact (Chan et al.'s merge)
    vector standardize     the same per dimension; vector l2 / none: nothing to fit
    dense bucketize        quantiles of the values: exact while at most ``max_sample``
                           values were seen, else of a uniform random sample of that
                           many (approximate: rank error about 1 / sqrt(max_sample))
    history                nothing: each row carries its history as a list column named
                           after the feature (``twotower data build`` writes it)

Rows count once per interaction: a query feature streamed from interaction rows
counts a user as often as the user interacts.

``fit_stream_pipeline`` runs that over a training stream (``data.source: stream``):
one pass fits the query features and counts the items; the item features are
fitted from the item table, which is held in memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from tqdm.auto import tqdm

from twotower.data.build.format import TRAIN_INTERACTIONS
from twotower.data.config import StreamConfig
from twotower.data.stream import ParquetStream, read_item_table
from twotower.errors import DataError
from twotower.features.categorical import (
    IdTransform,
    MultiHotTransform,
    OneHotTransform,
    SortedKeys,
)
from twotower.features.dense import DenseTransform
from twotower.features.history import HistoryTransform
from twotower.features.pipeline import FeaturePipeline
from twotower.features.specs import FeaturesConfig, HistoryFeature
from twotower.features.transform import FitContext, Transform
from twotower.features.vector import VectorTransform
from twotower.storage import atomic_write, read_json

log = logging.getLogger(__name__)

ITEM_COUNTS_FILE = "item_counts.npy"  # a streamed fit's training count of each item
FIT_FILE = "fit.json"  # which fits of a streamed fit are exact


class CountSummary:
    """Counts of the values of a column: exact, or Misra-Gries past ``capacity`` values."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.values: pa.Array | None = None
        self.counts = np.zeros(0, np.int64)
        self.total = 0
        self.error = 0  # what any count may be short by (0: exact)

    def update(self, values: pa.Array) -> None:
        values = values.filter(pc.invert(pc.is_null(values)))
        if not len(values):
            return
        counted = pc.value_counts(values)
        batch_values, batch_counts = counted.field("values"), counted.field("counts").to_numpy()
        self.total += int(batch_counts.sum())
        if self.values is not None:
            merged = (
                pa.table(
                    {
                        "v": pa.concat_arrays([self.values, batch_values.cast(self.values.type)]),
                        "c": np.concatenate([self.counts, batch_counts]),
                    }
                )
                .group_by("v")
                .aggregate([("c", "sum")])
            )
            batch_values, batch_counts = merged.column("v"), merged.column("c_sum").to_numpy()
            batch_values = batch_values.combine_chunks()
        if len(batch_counts) > self.capacity:
            # Misra-Gries: take the (capacity+1)-th largest count off every counter
            cut = np.partition(batch_counts, len(batch_counts) - self.capacity - 1)[
                len(batch_counts) - self.capacity - 1
            ]
            keep = np.flatnonzero(batch_counts > cut)
            self.error += int(cut)
            batch_values = batch_values.take(pa.array(keep))
            batch_counts = batch_counts[keep] - cut
        self.values, self.counts = batch_values, batch_counts.astype(np.int64)

    @property
    def exact(self) -> bool:
        return self.error == 0


class MomentSummary:
    """Count, mean and sum of squared deviations of the observed values, merged exactly:
    of numbers (x: (n,)), or of each dimension of vectors (x: (n, dim))."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: np.ndarray) -> None:
        if not len(x):
            return
        n, mean = len(x), x.mean(axis=0)
        m2 = ((x - mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total


class SampleSummary:
    """A uniform random sample without replacement of at most ``capacity`` values.

    Each value gets a random key; the ``capacity`` smallest keys are kept (bottom-k
    sampling), so the sample does not depend on how the stream was batched beyond
    the order of the keys drawn.
    """

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self.values = np.zeros(0)
        self.keys = np.zeros(0)
        self.seen = 0

    def update(self, x: np.ndarray) -> None:
        self.seen += len(x)
        values = np.concatenate([self.values, x])
        keys = np.concatenate([self.keys, self.rng.random(len(x))])
        if len(values) > self.capacity:
            keep = np.argpartition(keys, self.capacity - 1)[: self.capacity]
            values, keys = values[keep], keys[keep]
        self.values, self.keys = values, keys

    @property
    def exact(self) -> bool:
        return self.seen <= self.capacity


@dataclasses.dataclass
class StreamingFit:
    """Summaries of one side's features, updated batch by batch, then fitted.

    Args:
        transforms: the side's (unfitted) transforms, by feature name.
        max_distinct: counters per categorical feature before counts turn approximate.
        max_sample: values per bucketized feature before quantiles turn approximate.
        seed: the sample's random keys.
    """

    transforms: dict[str, Transform]
    max_distinct: int = 5_000_000
    max_sample: int = 1_000_000
    seed: int = 0
    summaries: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, transform in self.transforms.items():
            spec = transform.spec
            if isinstance(transform, HistoryTransform):
                transform.fit_rows()  # each row carries its history: nothing to fit
                continue
            if isinstance(transform, (OneHotTransform, MultiHotTransform)) or (
                isinstance(transform, IdTransform) and not spec.hash_buckets
            ):
                self.summaries[name] = CountSummary(self.max_distinct)
            elif isinstance(transform, DenseTransform):
                if spec.transform == "bucketize":
                    self.summaries[name] = SampleSummary(self.max_sample, self.seed)
                else:
                    self.summaries[name] = MomentSummary()
            elif isinstance(transform, VectorTransform) and spec.normalize == "standardize":
                self.summaries[name] = MomentSummary()

    def update(self, table: pa.Table) -> None:
        """Adds a batch of rows (a table with the side's feature columns)."""
        for name, summary in self.summaries.items():
            transform = self.transforms[name]
            values = table.column(transform.spec.column).combine_chunks()
            if isinstance(summary, CountSummary):
                if isinstance(transform, MultiHotTransform):
                    values = transform.tokens(values)
                summary.update(values)
            else:  # a number's or a vector's moments
                summary.update(transform.observed(values))

    def finish(self) -> dict[str, bool]:
        """Fits every transform from its summary; returns which fits are exact."""
        exact = {}
        for name, transform in self.transforms.items():
            summary = self.summaries.get(name)
            if isinstance(transform, HistoryTransform):  # fitted already (fit_rows)
                exact[name] = True
            elif summary is None:
                transform.fit(pa.array([], pa.null()), FitContext())
                exact[name] = True
            elif isinstance(summary, CountSummary):
                values = summary.values if summary.values is not None else pa.array([], pa.null())
                transform.fit(values, FitContext(weights=summary.counts))
                exact[name] = summary.exact
            elif isinstance(summary, SampleSummary):
                transform.fit_observed(summary.values)
                exact[name] = summary.exact
            else:
                std = np.sqrt(summary.m2 / summary.count) if summary.count else 1.0
                transform.fit_moments(summary.count, summary.mean, std)
                exact[name] = True
        return exact


class ItemKeys:
    """The corpus's item keys, found by binary search (integer or text keys)."""

    def __init__(self, keys: pa.Array, where: str) -> None:
        if pc.count_distinct(keys).as_py() != len(keys) or keys.null_count:
            raise DataError(f"{where}: item keys must be unique and not null")
        self.integer = pa.types.is_integer(keys.type)
        self._keys = SortedKeys(self._numpy(keys))

    def _numpy(self, values: pa.Array) -> np.ndarray:
        if self.integer:
            return pc.cast(pc.fill_null(values, 0), pa.int64()).to_numpy()
        text = pc.cast(pc.fill_null(values, ""), pa.string())
        return text.to_numpy(zero_copy_only=False).astype(str)

    def find(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """(rows,) item index of each key; -1 for keys not in the corpus."""
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        if self.integer and not pa.types.is_integer(values.type):
            return np.full(len(values), -1, np.int64)
        found = self._keys.find(self._numpy(values))
        return np.where(pc.is_null(values).to_numpy(zero_copy_only=False), -1, found)


def item_matrix(
    column: pa.ChunkedArray, keys: ItemKeys, num_items: int, path: Path
) -> sp.csr_matrix:
    """(rows, N) binary CSR of a list column of item ids (a build's ``seen`` or
    ``targets``); an id outside the corpus is an error naming ``path``."""
    lists = column.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy()
    found = keys.find(pc.list_flatten(lists))
    if (found < 0).any():
        raise DataError(f"{path}: {int((found < 0).sum())} item id(s) not in the build's corpus")
    rows = np.repeat(np.arange(len(lists)), lengths)
    ones = np.ones(len(found), np.float32)
    matrix = sp.csr_matrix((ones, (rows, found)), shape=(len(lists), num_items))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def fit_stream_pipeline(
    config: StreamConfig, features: FeaturesConfig, seed: int = 0
) -> tuple[FeaturePipeline, pa.Table, np.ndarray, dict[str, bool]]:
    """Fits the features from one pass over the training stream, in bounded memory.

    Returns:
        The fitted pipeline, the item table, the (N,) training count of each item,
        and whether each query feature's fit is exact (``twotower.features.streaming``).
    """
    items = read_items(config, features)
    item_keys = ItemKeys(items.column(config.item_id).combine_chunks(), str(config.items))
    pipeline = FeaturePipeline(features)
    query_fit = StreamingFit(
        pipeline.transforms["query"], config.max_distinct, config.max_sample, seed
    )
    columns = sorted(set(stream_query_columns(features)) | {config.item_id})
    stream = ParquetStream(config.train, columns)
    counts = np.zeros(items.num_rows, np.int64)
    pieces = stream.share(None, 0, 1)
    bar = tqdm(total=stream.num_rows, desc="fit features", unit="row", unit_scale=True)
    with bar:
        for table in stream.read(pieces):
            query_fit.update(table)
            found = item_keys.find(table.column(config.item_id))
            counts += np.bincount(found[found >= 0], minlength=len(counts))
            bar.update(table.num_rows)
    exact = query_fit.finish()
    pipeline.fit_side("item", items, config.item_id, counts)
    approximate = [name for name, ok in exact.items() if not ok]
    if approximate:
        log.info("fitted approximately (past max_distinct / max_sample): %s", approximate)
    return pipeline, items, counts, exact


def fit_built_pipeline(
    stream: StreamConfig, queries: Path, features: FeaturesConfig, key: str, seed: int = 0
) -> tuple[FeaturePipeline, np.ndarray, dict[str, bool]]:
    """Fits the features of a data build as ``FeaturePipeline.fit`` fits them in memory.

    A query feature on the key column ``key`` counts each id once per training
    interaction (read from the training rows); every other query feature counts each
    query with training interactions once (read from ``queries``, a build's
    ``queries_valid.parquet``: one row per query, its ``train_interactions``). The item
    features are fitted on the corpus rows with training interactions.

    Args:
        stream: the build as a stream (``twotower.data.build.format.built_stream``).
        queries: the build's one row per query.
        features: the features to fit.
        key: the query side's key column (the query table's key, else the
            interactions' query id).
        seed: the bucketized features' sample (exact below ``stream.max_sample``).

    Returns:
        The fitted pipeline, the (N,) training count of each item, and whether each
        query feature's fit is exact.
    """
    items = read_items(stream, features)
    item_keys = ItemKeys(items.column(stream.item_id).combine_chunks(), str(stream.items))
    pipeline = FeaturePipeline(features)
    transforms = pipeline.transforms["query"]
    on_key = {
        name: t
        for name, t in transforms.items()
        if not isinstance(t, HistoryTransform) and t.spec.column == key
    }
    fits = [
        StreamingFit(group, stream.max_distinct, stream.max_sample, seed)
        for group in (on_key, {n: t for n, t in transforms.items() if n not in on_key})
    ]
    counts = np.zeros(items.num_rows, np.int64)
    rows = ParquetStream(stream.train, sorted({stream.item_id, *_columns(on_key)}))
    bar = tqdm(total=rows.num_rows, desc="fit features", unit="row", unit_scale=True)
    with bar:
        for table in rows.read(rows.share(None, 0, 1)):
            fits[0].update(table)
            found = item_keys.find(table.column(stream.item_id))
            counts += np.bincount(found[found >= 0], minlength=len(counts))
            bar.update(table.num_rows)
    per_query = ParquetStream(queries, sorted({TRAIN_INTERACTIONS, *_columns(fits[1].transforms)}))
    for table in per_query.read(per_query.share(None, 0, 1)):
        fits[1].update(table.filter(pc.greater(table.column(TRAIN_INTERACTIONS), 0)))
    exact = {**fits[0].finish(), **fits[1].finish()}
    pipeline.fit_side("item", items, stream.item_id, counts)
    return pipeline, counts, exact


def save_fitted(
    folder: Path, pipeline: FeaturePipeline, counts: np.ndarray, exact: dict[str, bool]
) -> list[Path]:
    """Writes a streamed fit into ``folder``: the feature state, ``item_counts.npy`` and
    ``fit.json`` (which fits are exact); returns the files, each written atomically."""
    pipeline.save(folder)
    atomic_write(folder / ITEM_COUNTS_FILE, lambda f: np.save(f, counts, allow_pickle=False))
    fits = json.dumps({n: "exact" if ok else "approximate" for n, ok in exact.items()})
    atomic_write(folder / FIT_FILE, lambda f: f.write(fits.encode()))
    return sorted(folder.iterdir())


def load_fitted(folder: Path) -> tuple[FeaturePipeline, np.ndarray, dict[str, bool]]:
    """The feature state, item counts and exact fits ``save_fitted`` wrote."""
    counts = np.load(folder / ITEM_COUNTS_FILE, allow_pickle=False)
    fits = read_json(folder / FIT_FILE, "a streamed fit's record")
    return FeaturePipeline.load(folder), counts, {n: v == "exact" for n, v in fits.items()}


def _columns(transforms: dict[str, Transform]) -> set[str]:
    return {t.spec.column for t in transforms.values() if not isinstance(t, HistoryTransform)}


def stream_query_columns(features: FeaturesConfig) -> list[str]:
    """The columns of streamed rows the query features read: a history feature reads
    the list column named after it, every other feature its ``column``."""
    return sorted(
        spec.name if isinstance(spec, HistoryFeature) else spec.column for spec in features.query
    )


def read_items(config: StreamConfig, features: FeaturesConfig) -> pa.Table:
    """The item table (the corpus), with the columns the item features read."""
    columns = sorted({spec.column for spec in features.item} | {config.item_id})
    return read_item_table(config.items, columns)
