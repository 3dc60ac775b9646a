"""From a ``DataConfig`` to a checked ``Dataset``: user files, an adapter, or synthetic data."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twotower.data.config import DataConfig, FeatureTableConfig, InteractionsConfig, TableSpec
from twotower.data.dataset import (
    ITEM_ID,
    QUERY_ID,
    QUERY_IDX,
    SPLIT,
    TIMESTAMP,
    WEIGHT,
    Dataset,
)
from twotower.data.synthetic import generate
from twotower.data.tables import first_failure, position, read_table
from twotower.errors import ConfigError, DataError

log = logging.getLogger(__name__)

ColumnTypes = Mapping[str, pa.DataType | None]


# The folder each dataset adapter reads, named as its publisher ships it.
ADAPTER_FOLDERS = {
    "movielens-100k": "ml-100k",
    "movielens-1m": "ml-1m",
    "movielens-latest-small": "ml-latest-small",
    "movielens-latest-small-search": "ml-latest-small",
    "amazon-toys": "amazon-toys",
    "amazon-sports": "amazon-sports",
}


def with_data_dir(config: DataConfig, data_dir: Path) -> DataConfig:
    """The config reading its dataset folder from ``data_dir`` (``--data-dir``).

    Raises:
        ConfigError: the source is not a dataset adapter.
    """
    folder = ADAPTER_FOLDERS.get(config.source)
    if folder is None:
        raise ConfigError(
            f"--data-dir applies to the dataset adapters ({', '.join(ADAPTER_FOLDERS)}); "
            f"this config's data.source is {config.source!r}"
        )
    return dataclasses.replace(config, path=Path(data_dir) / folder)


def load_dataset(
    config: DataConfig,
    query_columns: ColumnTypes | None = None,
    item_columns: ColumnTypes | None = None,
) -> Dataset:
    """Loads and checks the dataset a config describes.

    Args:
        config: the data section of the config.
        query_columns: the query-table columns the features need, with the Arrow
            type each must convert to (None: any type).
        item_columns: the same for the item table.
    """
    if config.source == "files":
        dataset = _load_files(config, dict(query_columns or {}), dict(item_columns or {}))
    elif config.source == "synthetic":
        dataset = generate(config.synthetic).dataset
    else:
        if config.path is None:
            raise DataError(
                f"data.source {config.source!r} needs data.path, the dataset folder"
                + (" (the sequence file)" if config.source == "sequences" else "")
            )
        dataset = _adapter(config.source)(config.path)
    dataset = _keep_min_weight(dataset, config.min_weight)
    return _sample_queries(dataset, config.sample_queries, config.sample_seed)


def _sample_queries(dataset: Dataset, count: int | None, seed: int) -> Dataset:
    """The dataset with the interactions of ``count`` random queries only (all if None).

    The feature tables stay whole: the corpus is unchanged, and the queries left out
    simply have no interactions.
    """
    if count is None:
        return dataset
    active = np.unique(dataset.interactions.column(QUERY_IDX).to_numpy())
    if count >= len(active):
        return dataset
    chosen = np.random.default_rng(seed).choice(active, size=count, replace=False)
    mask = pc.is_in(dataset.interactions.column(QUERY_IDX), value_set=pa.array(chosen))
    log.info("kept the %d interactions of %d sampled queries", pc.sum(mask).as_py(), count)
    return dataclasses.replace(dataset, interactions=dataset.interactions.filter(mask))


def _load_files(config: DataConfig, query_columns: dict, item_columns: dict) -> Dataset:
    spec = config.interactions
    if spec is None:
        raise DataError("data.source 'files' needs data.interactions (a file path and columns)")
    parts = [_read_interactions(spec, spec)]
    if (config.valid is None) != (config.test is None):
        raise DataError("give both data.valid and data.test, or neither")
    if config.valid is not None:
        parts = [
            p.append_column(SPLIT, pa.array(np.full(p.num_rows, i, np.int8)))
            for i, p in enumerate(
                [
                    parts[0],
                    _read_interactions(config.valid, spec),
                    _read_interactions(config.test, spec),
                ]
            )
        ]
    queries = _read_side(config.queries, query_columns, "query", spec.query_id)
    items = _read_side(config.items, item_columns, "item", spec.item_id)
    return Dataset.from_tables(
        pa.concat_tables(parts, promote_options="permissive"),
        queries,
        items,
        query_key=config.queries.key if config.queries else spec.query_id,
        item_key=config.items.key if config.items else spec.item_id,
        name=str(spec.path),
        on_missing_rows=config.on_missing_rows,
    )


def _read_interactions(table: TableSpec, roles: InteractionsConfig) -> pa.Table:
    """Reads an interactions file and renames its columns to the canonical roles."""
    columns = {roles.query_id: QUERY_ID, roles.item_id: ITEM_ID}
    types: dict[str, pa.DataType | None] = {roles.query_id: None, roles.item_id: None}
    if roles.timestamp:
        columns[roles.timestamp] = TIMESTAMP
        types[roles.timestamp] = None
    if roles.weight:
        columns[roles.weight] = WEIGHT
        types[roles.weight] = pa.float64()
    raw = read_table(table, types).table
    if raw.num_rows == 0:  # else a header-only file fails later, on a column typed null
        raise DataError(f"{table.path}: the table has no rows (no interactions)")
    result = pa.table({canonical: raw.column(name) for name, canonical in columns.items()})
    if TIMESTAMP in result.column_names:
        result = _numeric_time(result, table, roles.timestamp)
    return result


def _numeric_time(table: pa.Table, spec: TableSpec, name: str) -> pa.Table:
    """Timestamps as numbers (seconds for Arrow timestamps) so they sort and cut."""
    column = table.column(TIMESTAMP).combine_chunks()
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        column = pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64())
    elif not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        bad = first_failure(column, lambda a: pc.cast(a, pa.float64()))
        if bad is None:  # numbers stored as text (a Parquet string column)
            column = pc.cast(column, pa.float64())
        else:
            raise DataError(
                f"{spec.path}, {position(spec, bad)}, column {name!r} (the timestamp): "
                f"{column[bad].as_py()!r} is not a number or a date"
            )
    if column.null_count:
        first = int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])
        raise DataError(
            f"{spec.path}: {column.null_count} interaction(s) have no timestamp "
            f"(column {name!r}); the first is on {position(spec, first)}"
        )
    return table.set_column(table.schema.get_field_index(TIMESTAMP), TIMESTAMP, column)


def _read_side(
    spec: FeatureTableConfig | None, columns: dict, side: str, id_column: str
) -> pa.Table | None:
    """The side's feature table, or None where there is none to read: then the side is
    its ids alone, so its features may read only ``id_column`` (an id embedding, a
    history keyed by the query id)."""
    if spec is None:
        table = "queries" if side == "query" else "items"
        others = sorted(set(columns) - {id_column})
        if others:
            raise DataError(
                f"the {side} features use column(s) {others}, but no {side} feature table "
                f"is configured (data.{table}); without one they can read only the "
                f"interactions' {side} id column {id_column!r}"
            )
        return None
    return read_table(spec, {spec.key: None, **columns}).table


def _adapter(source: str) -> Callable[[Path], Dataset]:
    """The reader of an adapter source (imported only when one is used)."""
    from twotower.data.movielens import ADAPTERS
    from twotower.data.sequences import AMAZON_FILES, amazon_adapter, load_sequences

    if source == "sequences":
        return load_sequences
    if source in AMAZON_FILES:
        return amazon_adapter(source)
    return ADAPTERS[source]


def _keep_min_weight(dataset: Dataset, min_weight: float | None) -> Dataset:
    if min_weight is None:
        return dataset
    if WEIGHT not in dataset.interactions.column_names:
        raise DataError(f"data.min_weight is set but {dataset.name} has no weight column")
    kept = dataset.interactions.filter(pc.greater_equal(dataset.interactions[WEIGHT], min_weight))
    log.info(
        "kept %d of %d interactions with weight >= %s",
        kept.num_rows,
        dataset.interactions.num_rows,
        min_weight,
    )
    return Dataset.from_tables(
        kept,
        dataset.queries,
        dataset.items,
        query_key=dataset.query_key,
        item_key=dataset.item_key,
        name=dataset.name,
    )
