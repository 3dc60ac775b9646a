"""The fitted feature state of both sides: fit on training data, transform, save, load.

Saved as two plain files, nothing pickled:
    ``features.json``: format version, each feature's spec and scalar state, and
        the SHA-256 of the arrays file (checked on load);
    ``features.npz``: every array (vocabularies, quantile boundaries, histories).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from twotower.config_io import from_dict, to_dict
from twotower.data.dataset import ITEM_IDX, QUERY_IDX, Dataset
from twotower.errors import ConfigError, DataError
from twotower.features.categorical import IdTransform, MultiHotTransform, OneHotTransform
from twotower.features.dense import DenseTransform
from twotower.features.growth import feature_differences
from twotower.features.history import HistoryTransform, Recent
from twotower.features.specs import SIDES, FeaturesConfig, FeatureSpec
from twotower.features.text import TextTransform
from twotower.features.transform import FitContext, Transform
from twotower.features.vector import VectorTransform
from twotower.storage import atomic_write

FORMAT_VERSION = 1
STATE_FILE = "features.json"
ARRAYS_FILE = "features.npz"

TRANSFORMS: dict[str, type[Transform]] = {
    "id": IdTransform,
    "onehot": OneHotTransform,
    "dense": DenseTransform,
    "multihot": MultiHotTransform,
    "history": HistoryTransform,
    "text": TextTransform,
    "vector": VectorTransform,
}


class FeaturePipeline:
    """Both sides' transforms, in config order. ``transform`` never raises on unseen values
    (a ``vector`` row of another width, or with a non-finite number, is no value:
    refused, by row)."""

    def __init__(self, config: FeaturesConfig) -> None:
        self.config = config
        self.transforms: dict[str, dict[str, Transform]] = {
            side: {spec.name: TRANSFORMS[spec.kind](spec) for spec in getattr(config, side)}
            for side in SIDES
        }

    @classmethod
    def fit(cls, config: FeaturesConfig, dataset: Dataset, train: pa.Table) -> FeaturePipeline:
        """Fits every transform on the training split only.

        A side's table is restricted to the ids with training interactions; a
        feature on the side's key column counts each id once per interaction.
        The item side is fitted first, since history features use its vocabulary.
        """
        pipeline = cls(config)
        item_counts = np.bincount(train.column(ITEM_IDX).to_numpy(), minlength=dataset.num_items)
        item_codes = pipeline.fit_side("item", dataset.items, dataset.item_key, item_counts)
        query_counts = np.bincount(
            train.column(QUERY_IDX).to_numpy(), minlength=dataset.num_queries
        )
        pipeline.fit_side(
            "query",
            dataset.queries,
            dataset.query_key,
            query_counts,
            FitContext(
                train=train,
                query_keys=dataset.queries.column(dataset.query_key).combine_chunks(),
                item_codes=item_codes,
            ),
        )
        return pipeline

    def fit_side(
        self,
        side: str,
        table: pa.Table,
        key: str,
        counts: np.ndarray,
        context: FitContext | None = None,
    ) -> dict[str, np.ndarray]:
        """Fits one side on the rows with training interactions; returns each id
        feature's codes of the whole table, by row.

        Args:
            side: ``query`` or ``item``.
            table: the side's feature table.
            key: its key column, whose values count once per interaction.
            counts: (rows,) training interactions of each row of ``table``.
            context: what history features need.
        """
        seen = np.flatnonzero(counts)
        fit_rows = table.take(pa.array(seen))
        context = context or FitContext()
        codes = {}
        for name, transform in self.transforms[side].items():
            spec = transform.spec
            _require_column(table, spec, side)
            weights = counts[seen] if spec.column == key else None
            transform.fit(
                fit_rows.column(spec.column),
                dataclasses.replace(context, weights=weights, rows=seen),
            )
            if isinstance(transform, IdTransform):
                codes[name] = transform.transform(table.column(spec.column))
        return codes

    def with_histories(self, dataset: Dataset, interactions: pa.Table) -> FeaturePipeline:
        """A copy whose history features are refit on ``interactions``; nothing else changes.

        Histories are state, not learned statistics: at the test step a user's history
        is train + validation, and a served user's is everything logged. Vocabularies,
        statistics and every other transform stay exactly as fitted on train.

        Args:
            dataset: the dataset whose query and item indices ``interactions`` uses.
            interactions: ``query_idx``, ``item_idx`` and maybe ``timestamp`` columns.
        """
        history = {
            name: t
            for name, t in self.transforms["query"].items()
            if isinstance(t, HistoryTransform)
        }
        if not history:
            return self
        context = FitContext(
            train=interactions,
            query_keys=dataset.queries.column(dataset.query_key).combine_chunks(),
            item_codes={
                name: t.transform(dataset.items.column(t.spec.column))
                for name, t in self.transforms["item"].items()
                if isinstance(t, IdTransform)
            },
        )
        copy = FeaturePipeline(self.config)
        copy.transforms = {side: dict(transforms) for side, transforms in self.transforms.items()}
        for name, transform in history.items():
            fresh = HistoryTransform(transform.spec)
            fresh.fit(pa.array([], pa.null()), context)
            copy.transforms["query"][name] = fresh
        return copy

    def extend(
        self,
        config: FeaturesConfig,
        dataset: Dataset,
        train: pa.Table,
        known: pa.Table | None = None,
    ) -> FeaturePipeline:
        """This pipeline, fitted on earlier data, carried onto new data (a warm start).

        What is kept, grown and rebuilt:
            id (vocabulary), multihot: grown: every old value keeps its code; the values
                of a fresh fit on ``train`` (its ``min_count`` counted there) that are
                new get the next codes, in the fresh fit's order (most frequent first);
                past ``max_size`` new values are left out, old ones never are.
            id (hashed), text: nothing to grow (hashing has no state).
            onehot, dense (standardize, log1p, bucketize), vector (a standardized one's
                means and deviations): kept as fitted, since a width or a statistic
                refitted on new data would shift every old input.
            history: rebuilt from ``known`` (per-query state, not a learned statistic).

        Args:
            config: the new features: this pipeline's, but for ``growth.GROWABLE`` and
                ``growth.WEIGHTLESS`` settings.
            dataset: the new data (its query and item indices).
            train: the new training interactions, on which new values are counted.
            known: the interactions histories hold; default ``train``.

        Raises:
            ConfigError: ``config`` describes other features (named, with the settings
                that differ).
        """
        changed = feature_differences(self.config, config)
        if changed:
            raise ConfigError(
                "the earlier features cannot be grown into these; they differ in "
                + ", ".join(changed)
            )
        fresh = FeaturePipeline.fit(config, dataset, train)
        grown = FeaturePipeline(config)
        grown.transforms = {
            side: {name: t.grow(fresh.transforms[side][name]) for name, t in transforms.items()}
            for side, transforms in self.transforms.items()
        }
        return grown.with_histories(dataset, train if known is None else known)

    def input_column(self, side: str, name: str) -> str:
        """The raw column that feature ``name`` of ``side`` reads: its ``column``, except
        a history fitted from rows (a data build), which reads the list column named
        after the feature (each row carries its own history)."""
        transform = self.transforms[side][name]
        if isinstance(transform, HistoryTransform) and transform.from_rows:
            return transform.spec.name
        return transform.spec.column

    def input_columns(self, side: str) -> list[str]:
        """Every raw column the features of ``side`` read, once each, in config order."""
        return list(dict.fromkeys(self.input_column(side, name) for name in self.transforms[side]))

    def state_columns(self, side: str) -> list[str]:
        """The raw columns a request-time row carries besides its ``Recent`` items: every
        input column except those only histories read (a build's history list columns)."""
        return list(
            dict.fromkeys(
                self.input_column(side, name)
                for name, t in self.transforms[side].items()
                if not isinstance(t, HistoryTransform)
            )
        )

    @property
    def recent_length(self) -> int:
        """The most recent items any query history feature reads (0: none reads any)."""
        lengths = [
            t.spec.max_len
            for t in self.transforms["query"].values()
            if isinstance(t, HistoryTransform)
        ]
        return max(lengths, default=0)

    def history_codes(self, items: pa.Table) -> dict[str, np.ndarray]:
        """For each query history feature, (N,) int64 the code of each row of ``items``
        in the item-id feature it shares: what ``transform``'s ``recent`` rows map to."""
        out = {}
        for name, transform in self.transforms["query"].items():
            if isinstance(transform, HistoryTransform):
                item = self.transforms["item"][transform.spec.item_feature]
                codes = item.transform(items.column(item.spec.column))
                out[name] = np.asarray(codes, dtype=np.int64)
        return out

    def transform(
        self,
        side: str,
        table: pa.Table,
        recent: Recent | None = None,
        codes: dict[str, np.ndarray] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Model inputs of a batch of raw rows (a table with the side's input columns).

        Args:
            side: ``query`` or ``item``.
            table: the raw rows.
            recent: each row's recent items, given at request time: the history
                features read these instead of their fitted state or a list column
                (and ``table`` needs only ``state_columns``).
            codes: with ``recent``, ``history_codes`` of the item table its rows index.

        Returns:
            Feature name -> tensor: ``id``/``bucketize``: (B,) int64; ``onehot``:
            (B, C) float32; ``dense``: (B, 2) float32; ``vector``: (B, dim) float32;
            ``multihot``/``text``/``history``: (B, L) int64, 0-padded; and for a
            history with ``time_buckets``, ``"{name}:times"``: (B, L) float64 its
            items' timestamps.

        Raises:
            DataError: ``table`` lacks a column a feature reads, or a vector feature
                refuses a row (named; ``row_errors`` finds every such row first).
        """
        out = {}
        for name, transform in self.transforms[side].items():
            if isinstance(transform, HistoryTransform) and recent is not None:
                assert codes is not None, "recent rows need the item table's history_codes"
                arrays = _recent_arrays(transform, recent, codes[name])
            elif isinstance(transform, HistoryTransform):
                arrays = self._history_inputs(transform, self._input_values(side, name, table))
            else:
                arrays = {name: transform.transform(self._input_values(side, name, table))}
            out.update({key: torch.from_numpy(array) for key, array in arrays.items()})
        return out

    def recent_inputs(
        self, recent: Recent, codes: dict[str, np.ndarray]
    ) -> dict[str, torch.Tensor]:
        """The query history features' model inputs of request-time ``recent`` items
        (``transform``'s for those features alone): the rest of a known user's inputs
        can then be its exported ones. ``codes``: ``history_codes`` of the item table."""
        out = {}
        for name, transform in self.transforms["query"].items():
            if isinstance(transform, HistoryTransform):
                arrays = _recent_arrays(transform, recent, codes[name])
                out.update({key: torch.from_numpy(array) for key, array in arrays.items()})
        return out

    def row_errors(self, side: str, table: pa.Table) -> dict[int, DataError]:
        """Each row of ``table`` that ``transform`` would refuse (a vector feature's row
        of another width, with a non-finite number, or missing where that is an
        error), by position, with its error: a request's rows are refused one by one,
        never the batch. Features whose column ``table`` lacks are not read."""
        errors: dict[int, DataError] = {}
        for name, transform in self.transforms[side].items():
            column = self.input_column(side, name)
            if isinstance(transform, VectorTransform) and column in table.column_names:
                for row, problem in transform.row_errors(table.column(column)).items():
                    errors.setdefault(row, DataError(problem))
        return errors

    def _input_values(self, side: str, name: str, table: pa.Table) -> pa.ChunkedArray:
        """The column of ``table`` that feature ``name`` reads (``input_column``)."""
        column = self.input_column(side, name)
        if column in table.column_names:
            return table.column(column)
        spec = self.transforms[side][name].spec
        if column != spec.column:  # a history's own list column
            raise DataError(
                f"history feature {spec.name!r} reads its rows' list column {column!r} (as "
                f"twotower data build writes it), which the {side} rows lack; they have "
                f"{table.column_names}"
            )
        _require_column(table, spec, side)
        return table.column(column)

    def _history_inputs(
        self, transform: HistoryTransform, values: pa.ChunkedArray
    ) -> dict[str, np.ndarray]:
        """A history's item codes and, with ``time_buckets``, their timestamps."""
        spec = transform.spec
        if transform.from_rows:  # each row's list of item ids, in the item vocabulary
            item = self.transforms["item"][spec.item_feature]
            return {spec.name: transform.transform_lists(values, item)}
        out = {spec.name: transform.transform(values)}
        if spec.time_buckets:
            out[spec.times_input] = transform.times(values)
        return out

    def transform_chunks(
        self,
        side: str,
        table: pa.Table,
        rows: int,
        recent: Recent | None = None,
        codes: dict[str, np.ndarray] | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """``transform`` of ``table`` (and ``recent``), ``rows`` rows at a time, each chunk
        when asked for (bounded memory: a tower pass can take each in turn)."""
        for start in range(0, table.num_rows, rows):
            part = None if recent is None else recent.slice(start, rows)
            yield self.transform(side, table.slice(start, rows), part, codes)

    def sizes(self, side: str) -> dict[str, int]:
        """Embedding rows (or vector width) of each feature of a side."""
        return {name: t.size for name, t in self.transforms[side].items()}

    def save(self, folder: Path) -> None:
        """Writes ``features.json`` and ``features.npz`` (each atomically)."""
        folder.mkdir(parents=True, exist_ok=True)
        text, arrays = self.to_bytes()
        atomic_write(folder / ARRAYS_FILE, lambda f: f.write(arrays))
        atomic_write(folder / STATE_FILE, lambda f: f.write(text))

    def to_bytes(self) -> tuple[bytes, bytes]:
        """The contents of ``features.json`` and ``features.npz``, e.g. for a checkpoint."""
        meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "config": to_dict(self.config)}
        arrays: dict[str, np.ndarray] = {}
        state: dict[str, dict[str, Any]] = {}
        for side in SIDES:
            for name, transform in self.transforms[side].items():
                scalars, named = transform.state()
                state[f"{side}.{name}"] = scalars
                arrays.update({f"{side}.{name}.{k}": v for k, v in named.items()})
        meta["state"] = state
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        meta["arrays_sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
        return json.dumps(meta, indent=2, sort_keys=True).encode("utf-8"), buffer.getvalue()

    @classmethod
    def load(cls, folder: Path) -> FeaturePipeline:
        """Reads what ``save`` wrote; refuses a changed, corrupt or newer-format state."""
        try:
            text = (folder / STATE_FILE).read_bytes()
        except FileNotFoundError:
            raise DataError(f"{folder / STATE_FILE}: no saved feature state here") from None
        arrays_file = folder / ARRAYS_FILE
        arrays = arrays_file.read_bytes() if arrays_file.is_file() else None
        return cls.from_bytes(text, arrays, where=str(folder / STATE_FILE))

    @classmethod
    def from_bytes(cls, text: bytes, arrays: bytes | None, where: str) -> FeaturePipeline:
        """The inverse of ``to_bytes``; ``where`` names the source in error messages."""
        try:
            meta = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{where}: corrupt ({err})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{where}: format version {meta.get('format_version')} is not "
                f"{FORMAT_VERSION}, the one this version of twotower reads"
            )
        if arrays is None or hashlib.sha256(arrays).hexdigest() != meta.get("arrays_sha256"):
            raise DataError(
                f"{where}: its arrays ({ARRAYS_FILE}) are missing or their checksum does not match"
            )
        pipeline = cls(from_dict(FeaturesConfig, meta["config"], where="features"))
        with np.load(io.BytesIO(arrays), allow_pickle=False) as npz:
            named_arrays = {k: npz[k] for k in npz.files}
        for side in SIDES:
            for name, transform in pipeline.transforms[side].items():
                prefix = f"{side}.{name}."
                named = {
                    k[len(prefix) :]: v for k, v in named_arrays.items() if k.startswith(prefix)
                }
                transform.load_state(meta["state"][f"{side}.{name}"], named)
        return pipeline


def _require_column(table: pa.Table, spec: FeatureSpec, side: str) -> None:
    if spec.column not in table.column_names:
        raise DataError(
            f"{side} feature {spec.name!r} reads column {spec.column!r}, which the {side} "
            f"table lacks; it has {', '.join(map(repr, table.column_names))}"
        )


def _recent_arrays(
    transform: HistoryTransform, recent: Recent, codes: np.ndarray
) -> dict[str, np.ndarray]:
    """A history feature's inputs of request-time ``recent`` items: its item codes and,
    with ``time_buckets``, their timestamps."""
    items, times = transform.transform_recent(recent, codes)
    arrays = {transform.spec.name: items}
    if transform.spec.time_buckets:
        arrays[transform.spec.times_input] = times
    return arrays
