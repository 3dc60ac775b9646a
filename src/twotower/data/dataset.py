"""The data model: interactions plus one feature table per side (query, item).

``Dataset.from_tables`` is the single gate every source goes through (files,
MovieLens adapters, the synthetic generator): it checks the keys, links each
interaction to its feature rows and gives each query and item a dense index.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twotower.data.config import MissingRows
from twotower.data.tables import first_failure
from twotower.errors import DataError

log = logging.getLogger(__name__)

QUERY_ID = "query_id"
ITEM_ID = "item_id"
TIMESTAMP = "timestamp"
WEIGHT = "weight"
QUERY_IDX = "query_idx"
ITEM_IDX = "item_idx"
# Set only when the user gave their own train/valid/test files: 0, 1 or 2.
SPLIT = "split"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Interactions linked to a query table and an item table.

    Attributes:
        interactions: columns ``query_id``, ``item_id``, ``query_idx`` and ``item_idx``
            (int64 row positions in ``queries`` / ``items``), and optionally
            ``timestamp``, ``weight`` and ``split``. Row order is the source's order.
        queries: one row per query (user); its key column is ``query_key``.
        items: one row per item; the whole corpus that retrieval ranks.
        query_key: the key column of ``queries``.
        item_key: the key column of ``items``.
        name: a label for reports.
    """

    interactions: pa.Table
    queries: pa.Table
    items: pa.Table
    query_key: str
    item_key: str
    name: str = "dataset"

    @property
    def num_queries(self) -> int:
        return self.queries.num_rows

    @property
    def num_items(self) -> int:
        return self.items.num_rows

    @property
    def has_timestamps(self) -> bool:
        return TIMESTAMP in self.interactions.column_names

    def column(self, name: str) -> np.ndarray:
        """An interaction column as a numpy array."""
        return self.interactions.column(name).to_numpy()

    @classmethod
    def from_tables(
        cls,
        interactions: pa.Table,
        queries: pa.Table | None = None,
        items: pa.Table | None = None,
        *,
        query_key: str = QUERY_ID,
        item_key: str = ITEM_ID,
        name: str = "dataset",
        on_missing_rows: MissingRows = "error",
    ) -> Dataset:
        """Checks and links the three tables.

        Args:
            interactions: at least ``query_id`` and ``item_id`` columns.
            queries: the query feature table, or None (then the ids alone).
            items: the item feature table, or None (then the ids alone).
            query_key: the key column of ``queries``.
            item_key: the key column of ``items``.
            name: a label for reports.
            on_missing_rows: what to do with an interaction whose id has no feature
                row: ``error``; ``impute`` (add a row whose features are missing);
                ``drop`` (drop the interaction).

        Raises:
            DataError: no interactions, a null id, a duplicated key, an id
                without a feature row (when ``on_missing_rows="error"``).
        """
        _require(interactions, [QUERY_ID, ITEM_ID], "interactions")
        if interactions.num_rows == 0:
            raise DataError(f"{name}: the interactions table has no rows")
        for column in (QUERY_ID, ITEM_ID):
            _reject_nulls(interactions, column, name)
        interactions = interactions.drop_columns(
            [c for c in (QUERY_IDX, ITEM_IDX) if c in interactions.column_names]
        )
        queries = _side_table(queries, interactions, QUERY_ID, query_key, "query")
        items = _side_table(items, interactions, ITEM_ID, item_key, "item")
        interactions = _cast_ids(interactions, QUERY_ID, queries.schema.field(query_key).type, name)
        interactions = _cast_ids(interactions, ITEM_ID, items.schema.field(item_key).type, name)
        for side, id_col, table, key in (
            ("query", QUERY_ID, queries, query_key),
            ("item", ITEM_ID, items, item_key),
        ):
            idx = pc.index_in(interactions.column(id_col), value_set=table.column(key))
            if idx.null_count:
                interactions, table = _handle_missing_rows(
                    interactions, table, idx, id_col, key, side, on_missing_rows, name
                )
                idx = pc.index_in(interactions.column(id_col), value_set=table.column(key))
            if interactions.num_rows == 0:
                raise DataError(f"{name}: no interactions are left after dropping unknown ids")
            interactions = interactions.append_column(
                QUERY_IDX if side == "query" else ITEM_IDX, pc.cast(idx, pa.int64())
            )
            if side == "query":
                queries = table
            else:
                items = table
        return cls(interactions, queries, items, query_key, item_key, name)


def _require(table: pa.Table, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"the {what} table lacks column(s) {missing}; it has {table.column_names}")


def _reject_nulls(table: pa.Table, column: str, name: str) -> None:
    values = table.column(column)
    if values.null_count:
        first = int(np.flatnonzero(pc.is_null(values).to_numpy(zero_copy_only=False))[0])
        raise DataError(
            f"{name}: {values.null_count} interaction(s) have an empty {column}; "
            f"the first is interaction row {first} (0-based, header not counted)"
        )


def _side_table(
    table: pa.Table | None, interactions: pa.Table, id_col: str, key: str, side: str
) -> pa.Table:
    if table is None:
        ids = pc.unique(interactions.column(id_col))
        return pa.table({key: pc.take(ids, pc.sort_indices(ids))})
    _require(table, [key], f"{side} feature")
    keys = table.column(key)
    if keys.null_count:
        raise DataError(f"the {side} feature table has {keys.null_count} row(s) with no {key!r}")
    if pc.count_distinct(keys).as_py() != table.num_rows:
        counts = pc.value_counts(keys)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]
        raise DataError(
            f"the {side} feature table must have one row per {key!r}, but "
            f"{dup['values'].as_py()!r} appears {dup['counts'].as_py()} times"
        )
    return table.combine_chunks()


def _cast_ids(interactions: pa.Table, column: str, key_type: pa.DataType, name: str) -> pa.Table:
    """Makes interaction ids comparable with the feature table keys (e.g. int vs string)."""
    values = interactions.column(column)
    if values.type == key_type:
        return interactions
    try:
        cast = pc.cast(values, key_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        values = values.combine_chunks()
        bad = first_failure(values, lambda a: pc.cast(a, key_type)) or 0
        side = "query" if column == QUERY_ID else "item"
        raise DataError(
            f"{name}: interaction row {bad} (0-based): {column} {values[bad].as_py()!r} is "
            f"{values.type}, and the {side} feature table's keys are {key_type}: the ids do "
            "not convert (give both files ids of one type)"
        ) from None
    return interactions.set_column(interactions.schema.get_field_index(column), column, cast)


def _handle_missing_rows(
    interactions: pa.Table,
    table: pa.Table,
    idx: pa.ChunkedArray,
    id_col: str,
    key: str,
    side: str,
    policy: MissingRows,
    name: str,
) -> tuple[pa.Table, pa.Table]:
    missing = pc.is_null(idx)
    unknown = pc.unique(interactions.column(id_col).filter(missing))
    shown = ", ".join(repr(v) for v in unknown[:5].to_pylist())
    if policy == "drop":
        log.warning(
            "%s: dropped %d interaction(s) of %d %s id(s) that have no row in the %s feature "
            "table (for example %s; data.on_missing_rows: drop)",
            name,
            pc.sum(missing).as_py(),
            len(unknown),
            side,
            side,
            shown,
        )
        return interactions.filter(pc.invert(missing)), table
    if policy == "impute":
        log.warning(
            "%s: %d %s id(s) have no row in the %s feature table (for example %s); their "
            "features are imputed as missing (data.on_missing_rows: impute)",
            name,
            len(unknown),
            side,
            side,
            shown,
        )
        extra = pa.table(
            {
                c: unknown if c == key else pa.nulls(len(unknown), table.schema.field(c).type)
                for c in table.column_names
            }
        )
        return interactions, pa.concat_tables([table, extra.cast(table.schema)])
    raise DataError(
        f"{name}: {len(unknown)} {side} id(s) in the interactions have no row in the {side} "
        f"feature table (for example {shown}); add the rows, or set "
        "data.on_missing_rows to 'impute' or 'drop'"
    )
