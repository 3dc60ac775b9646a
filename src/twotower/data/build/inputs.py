"""The plan's first steps: the interactions loaded and each side's table linked, as
``Dataset.from_tables`` links them in memory, every check and its message written
once for every engine.

Tables made here: ``interactions`` (the canonical columns and each row's
``position``, its place in the source after ``min_weight``), ``query_table`` and
``item_table`` (each side's ``key`` and feature columns, in source order).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from twotower.data.build.format import POSITION, interaction_roles
from twotower.data.build.job import Database
from twotower.data.config import DataConfig, FeatureTableConfig, InteractionsConfig, TableSpec
from twotower.data.dataset import ITEM_ID, QUERY_ID, TIMESTAMP, WEIGHT
from twotower.errors import DataError

log = logging.getLogger(__name__)

PART = "part"  # 0 train, 1 valid, 2 test: given by the source, or assigned by the split
SIDE_TABLES = {"query": "query_table", "item": "item_table"}


def load_interactions(db: Database, data: DataConfig, features: dict[str, list[str]]) -> None:
    """Tables ``interactions``, ``query_table`` and ``item_table`` (the module doc),
    ``features``: each side's feature columns.

    Raises:
        DataError: a file is missing, unreadable or lacks a column; an id is empty or
            does not convert to its table's key type; a table's key is empty or
            repeated; ids without a row (``data.on_missing_rows: error``).
    """
    spec = data.interactions
    assert spec is not None
    _read_interactions(db, data)
    q = db.dialect.quote
    for column in (QUERY_ID, ITEM_ID):
        empty = db.rows(f"SELECT count(*) FROM raw WHERE {q(column)} IS NULL")[0][0]
        if empty:
            raise DataError(f"{spec.path}: {empty} interaction(s) have an empty {column}")
    if db.rows("SELECT count(*) FROM raw")[0][0] == 0:
        raise DataError(f"{spec.path}: the table has no rows (no interactions)")
    if db.columns("raw").get(TIMESTAMP, "").lower().startswith(("timestamp", "date")):
        # seconds, as in memory
        db.cast_column("raw", TIMESTAMP, "BIGINT", db.dialect.epoch_seconds(q(TIMESTAMP)))
    for side, table in (("query", data.queries), ("item", data.items)):
        link_side(db, side, table, features.get(side, []), data.on_missing_rows, spec)
    keep = ""
    if data.min_weight is not None:
        if not spec.weight:
            raise DataError(f"data.min_weight is set but {spec.path} has no weight column")
        keep = f"WHERE {q(WEIGHT)} >= {float(data.min_weight)!r}"
    columns = ", ".join(q(c) for c in db.columns("raw") if c not in db.helpers)
    position = f"row_number() OVER (ORDER BY {db.source_order('raw')}) - 1"
    db.create(
        "interactions",
        f"SELECT {columns}, CAST({position} AS BIGINT) AS {POSITION} FROM raw {keep}",
    )
    db.drop("raw")


def _read_interactions(db: Database, data: DataConfig) -> None:
    """Table ``raw``: every interaction file's rows (canonical columns; ``part`` where
    the user split them), in source order."""
    assert data.interactions is not None
    q = db.dialect.quote
    roles = {
        column: canonical for canonical, column in interaction_roles(data.interactions).items()
    }
    selects = []
    for number, (table, given) in enumerate(interaction_sources(data)):
        scan = db.scan(table, number)
        missing = [c for c in roles if c not in scan.columns]
        if missing:
            raise DataError(f"{table.path}: no column(s) {missing}; it has {scan.columns}")
        columns = [f"{q(c)} AS {q(canonical)}" for c, canonical in roles.items()] + scan.order
        if given is not None:
            columns.append(f"CAST({given} AS TINYINT) AS {PART}")
        selects.append(f"SELECT {', '.join(columns)} FROM {scan.relation}")
    db.create("raw", " UNION ALL ".join(selects))


def interaction_sources(data: DataConfig) -> list[tuple[TableSpec, int | None]]:
    """The interaction files and, with the user's own split, each one's part."""
    assert data.interactions is not None
    if data.valid is None and data.test is None:
        return [(data.interactions, None)]
    if data.valid is None or data.test is None:
        raise DataError("give both data.valid and data.test, or neither")
    return [(data.interactions, 0), (data.valid, 1), (data.test, 2)]


def link_side(
    db: Database,
    side: str,
    table: FeatureTableConfig | None,
    columns: list[str],
    policy: str,
    interactions: InteractionsConfig,
) -> None:
    """Table ``query_table`` / ``item_table``: the side's key and feature ``columns``, one
    row per id, as ``Dataset.from_tables`` links them: the interactions' ids cast to the
    key's type, and ids without a row an error, dropped or imputed (``policy``). Without
    a feature table the side is its ids alone, sorted."""
    canonical = QUERY_ID if side == "query" else ITEM_ID
    id_column = interactions.query_id if side == "query" else interactions.item_id
    name = SIDE_TABLES[side]
    if table is None:
        error = no_table_error(side, columns, id_column)
        if error is not None:
            raise error
        key = db.dialect.quote(canonical)
        db.create(name, f"SELECT DISTINCT {key} AS key FROM raw ORDER BY 1")
        return
    _side_table(db, name, side, table, columns)
    _cast_ids(db, name, canonical, id_column, table, interactions)
    _unknown_ids(db, name, side, canonical, policy, interactions.path, table.path)


def _side_table(
    db: Database, name: str, side: str, table: FeatureTableConfig, columns: list[str]
) -> None:
    """Table ``name``: ``table``'s key (as ``key``) and ``columns``, checked: every
    column present, every key given once."""
    q = db.dialect.quote
    scan = db.scan(table, 0)
    wanted = [table.key, *[c for c in columns if c != table.key]]
    missing = [c for c in wanted if c not in scan.columns]
    if missing:
        raise DataError(f"{table.path}: no column(s) {missing}; it has {scan.columns}")
    select = [f"{q(c)} AS key" if c == table.key else q(c) for c in wanted] + scan.order
    db.create(name, f"SELECT {', '.join(select)} FROM {scan.relation}")
    nulls, rows, distinct = db.rows(
        f"SELECT count(*) - count(key), count(*), count(DISTINCT key) FROM {name}"
    )[0]
    if nulls:
        raise DataError(f"{table.path}: {nulls} row(s) with no {table.key!r}")
    if distinct != rows:
        dup, times = db.rows(
            f"SELECT key, count(*) FROM {name} GROUP BY key HAVING count(*) > 1 LIMIT 1"
        )[0]
        raise duplicate_key_error(table, side, dup, times)


def _cast_ids(
    db: Database,
    name: str,
    canonical: str,
    id_column: str,
    table: FeatureTableConfig,
    interactions: InteractionsConfig,
) -> None:
    """The interactions' ids cast to the type of ``name``'s keys, as in memory; an id
    that does not convert is named, with its row."""
    key_type = db.columns(name)["key"]
    if db.columns("raw")[canonical] == key_type:
        return
    ids = db.dialect.quote(canonical)
    bad = db.first_row("raw", ids, f"try_cast({ids} AS {key_type}) IS NULL")
    if bad is not None:
        raise DataError(
            f"{interactions.path}: interaction row {bad[1]} (0-based): {id_column} "
            f"{bad[0]!r} does not convert to {key_type}, the type of {table.path}'s keys "
            "(give both files ids of one type)"
        )
    db.cast_column("raw", canonical, key_type)


def _unknown_ids(
    db: Database,
    name: str,
    side: str,
    canonical: str,
    policy: str,
    interactions: Path,
    table: Path,
) -> None:
    """The interactions' ids without a row in ``name``: an error, dropped with their
    interactions, or given rows of missing features (``policy``)."""
    ids = db.dialect.quote(canonical)
    unknown = f"SELECT DISTINCT r.{ids} FROM raw r ANTI JOIN {name} t ON r.{ids} = t.key"
    count = db.rows(f"SELECT count(*) FROM ({unknown}) u")[0][0]
    if not count:
        return
    shown = ", ".join(repr(r[0]) for r in db.rows(f"{unknown} ORDER BY 1 LIMIT 5"))
    missing_rows(policy, side, count, shown, interactions, table)
    if policy == "drop":
        db.delete("raw", f"{ids} IN ({unknown})")
    elif policy == "impute":
        db.append_keys(name, unknown)


def no_table_error(side: str, columns: list[str], id_column: str) -> DataError | None:
    """The error for features reading columns other than the id of a side without a
    table, or None."""
    others = sorted(set(columns) - {id_column})
    if not others:
        return None
    return DataError(
        f"the {side} features use column(s) {others}, but no {side} feature table is "
        f"configured (data.{'queries' if side == 'query' else 'items'})"
    )


def duplicate_key_error(table: FeatureTableConfig, side: str, key: Any, times: int) -> DataError:
    return DataError(
        f"{table.path}: the {side} feature table must have one row per {table.key!r}, "
        f"but {key!r} appears {times} times"
    )


def missing_rows(
    policy: str, side: str, count: int, shown: str, interactions: Path, table: Path
) -> None:
    """Logs what ``drop`` or ``impute`` does with ``count`` ids without a row; raises
    for ``error``."""
    if policy == "drop":
        log.warning(
            "dropped the interactions of %d %s id(s) without a row (%s)", count, side, shown
        )
    elif policy == "impute":
        log.warning("%d %s id(s) without a row get missing features (%s)", count, side, shown)
    else:
        raise DataError(
            f"{interactions}: {count} {side} id(s) in the interactions have no row in "
            f"{table} (for example {shown}); add the rows, or set data.on_missing_rows to "
            "'impute' or 'drop'"
        )
