"""Building a dataset's split out of core, on DuckDB (``twotower data build``).

The interactions (Parquet or CSV, any size) go into an on-disk DuckDB database in the
build folder, which spills to disk under ``memory_limit``; the split is SQL over them,
and each part is written as Parquet. The split equals ``split_interactions`` on the same
data, row for row:

    position      every kept interaction's place in the source (files in name order,
                  rows in file order), after ``min_weight``: the row order of the
                  in-memory ``Dataset``
    leave_last_out, time, given    window functions and quantiles over the rows
    random        numpy's draw for each position (the in-memory split's own stream,
                  drawn in chunks and written beside the database), ranked per query

With ``Histories``, each training row also gets, per history feature, its query's
history as a list of item ids (most recent first), made leak-free as in memory
(``before_event``: window functions over the rows before it; ``mask_target``: the
query's latest items with the target's entries null), and each query its latest
history and seen items as of the end of train and of train + validation.

The output folder appears whole or not at all (``storage.replaced_folder``):

    DIR/train/part-00000.parquet ...   training interactions, ``rows_per_part`` a file,
                                       row groups of ``row_group_rows`` (the stream
                                       reader's unit of work), with history columns
    DIR/valid.parquet, DIR/test.parquet
    DIR/items.parquet                  the corpus, with the item features' columns
    DIR/queries_valid.parquet          one row per query as of each step (before
    DIR/queries_test.parquet           validation, before test, after everything): its
    DIR/queries_all.parquet            features, histories, seen items, the step's own
                                       items (targets) and its training rows
    DIR/features/                      the features fitted once (``finish``)
    DIR/manifest.json                  rows and sha256 of every file, written last
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from twotower.data.config import (
    DataConfig,
    FeatureTableConfig,
    InteractionsConfig,
    SplitConfig,
    StreamConfig,
    TableSpec,
)
from twotower.data.dataset import ITEM_ID, QUERY_ID, TIMESTAMP, WEIGHT
from twotower.data.splits import SPLIT_NAMES
from twotower.errors import ConfigError, DataError
from twotower.storage import atomic_write, replaced_folder, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 2  # 2: queries_valid / queries_test for every query, columns, fitted features
FEATURES_DIR = "features"  # the fitted feature state's folder in a build
ENGINES = ("duckdb", "spark")
POSITION = "position"  # an interaction's place in the source, after min_weight
PART = "part"
TRAIN_INTERACTIONS = "train_interactions"
# what a query's row in queries_valid / queries_test holds besides its id, features
# and histories: the items known before the part, the part's items, its training rows
SEEN, TARGETS = "seen", "targets"
# a query's state as of each step: before validation, before test, after everything
# (for serving; its targets are empty), in queries_{step}.parquet
STEPS = ("valid", "test", "all")
QUERY_COLUMNS = (SEEN, TARGETS, TRAIN_INTERACTIONS)
_DRAW_CHUNK = 1 << 22


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How a build runs.

    Attributes:
        memory_limit: DuckDB's ``memory_limit`` (e.g. ``"4GB"``): what it holds in memory
            before it spills to the build folder; None: DuckDB's default (80% of RAM).
        threads: DuckDB's threads; None: its default (every core).
        rows_per_part: training rows per Parquet file.
        row_group_rows: rows per Parquet row group.
    """

    memory_limit: str | None = None
    threads: int | None = None
    rows_per_part: int = 5_000_000
    row_group_rows: int = 100_000

    def __post_init__(self) -> None:
        if self.row_group_rows < 1 or self.rows_per_part % self.row_group_rows:
            raise ValueError(
                f"rows_per_part ({self.rows_per_part}) must be a multiple of row_group_rows "
                f"({self.row_group_rows}) >= 1"
            )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


@dataclasses.dataclass(frozen=True)
class Histories:
    """The history list columns a build adds, one per query-side history feature.

    Attributes:
        lengths: column name -> max_len: each training row gets the item ids of its
            query's history (most recent first, at most max_len), and
            ``queries_valid.parquet`` / ``queries_test.parquet`` each query's latest
            history as of the end of train / of train + validation.
        rule: how a training row's history avoids its own target, as
            ``training.history``: ``before_event`` (the query's training items strictly
            before it), ``mask_target`` (the query's latest training items, the target's
            entries null), ``auto`` (``before_event`` where there are timestamps).
    """

    lengths: dict[str, int] = dataclasses.field(default_factory=dict)
    rule: str = "auto"

    def resolved_rule(self, has_timestamps: bool) -> str:
        if self.rule != "auto":
            return self.rule
        return "before_event" if has_timestamps else "mask_target"


def build_split(
    data: DataConfig,
    split: SplitConfig,
    out: Path,
    options: BuildOptions | None = None,
    histories: Histories | None = None,
    engine: str = "duckdb",
    master: str = "local[2]",
    columns: dict[str, list[str]] | None = None,
    finish: Callable[[Path], dict[str, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Splits the interactions ``data`` names into ``out`` (see the module doc), with
    ``histories``' list columns if given, on ``engine`` (``duckdb``, or ``spark`` on
    the cluster ``master``: the same output). ``columns``: each side's feature columns
    (``query``: joined into every row from ``data.queries``; ``item``: written with the
    corpus to ``items.parquet``). ``finish``: called with the staging folder once the
    parts are written (it fits the features there); the files it returns (path relative
    to the folder -> rows and sha256) join the manifest.

    Returns:
        The manifest: each file's rows and sha256, each part's rows, the seconds taken.

    Raises:
        ConfigError: the data is not a ``files`` source.
        DataError: a file is missing, unreadable or lacks a column; an id is empty; a
            part would be empty; ``out`` exists and is not a build.
    """
    options = options or BuildOptions()
    histories = histories or Histories()
    columns = columns or {}
    if data.source != "files" or data.interactions is None:
        raise ConfigError(
            f"twotower data build reads data.source 'files' (data.interactions), not "
            f"{data.source!r}"
        )
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose {' or '.join(ENGINES)}")
    clock = time.perf_counter()
    with replaced_folder(out, MANIFEST, "a data build") as staging:
        if engine == "spark":
            from twotower.data.build_spark import spark_build

            files, rule = spark_build(data, split, staging, options, histories, master, columns)
        else:
            files, rule = _duckdb_build(data, split, staging, options, histories, columns)
        if finish is not None:
            files.update(finish(staging))
        manifest = {
            "format": FORMAT,
            "engine": engine,
            "columns": output_columns(data, columns).roles,
            "split": dataclasses.asdict(split),
            "histories": dict(histories.lengths),
            "history_rule": rule if histories.lengths else None,
            "rows": {
                name: sum(f["rows"] for p, f in files.items() if _part_of(p) == name)
                for name in SPLIT_NAMES
            },
            "files": files,
            "seconds": round(time.perf_counter() - clock, 3),
        }
        text = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        atomic_write(staging / MANIFEST, lambda f: f.write(text))
    return manifest


def _duckdb_build(
    data: DataConfig,
    split: SplitConfig,
    staging: Path,
    options: BuildOptions,
    histories: Histories,
    columns: dict[str, list[str]],
) -> tuple[dict[str, dict[str, Any]], str]:
    """The build on DuckDB, in ``staging``; returns the files written and the history
    rule applied."""
    import duckdb

    con = duckdb.connect(str(staging / "build.duckdb"))
    try:
        settings = {"preserve_insertion_order": "true", "temp_directory": str(staging)}
        if options.memory_limit:
            settings["memory_limit"] = options.memory_limit
        if options.threads:
            settings["threads"] = str(options.threads)
        for name, value in settings.items():
            con.execute(f"SET {name} = '{value}'")
        _load_interactions(con, data, columns)
        _assign_parts(con, split, staging)
        present = [r[0] for r in con.execute("DESCRIBE interactions").fetchall()]
        rule = histories.resolved_rule(TIMESTAMP in present)
        outputs = output_columns(data, columns)
        files = _write_parts(con, staging, options, histories, rule, outputs)
        files.update(_write_items(con, staging, options, outputs))
        files.update(_write_queries(con, staging, options, histories, outputs))
    except duckdb.OutOfMemoryException as err:
        limit = options.memory_limit or "its default, 80% of RAM"
        raise DataError(
            f"DuckDB ran out of memory under memory_limit {limit} "
            f"({str(err).splitlines()[0]}); raise --memory-limit, or lower --threads"
        ) from None
    finally:
        con.close()
    for leftover in ["build.duckdb", "build.duckdb.wal", "draws.parquet"]:
        (staging / leftover).unlink(missing_ok=True)
    return files, rule


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a build, every file checked against its rows and sha256.

    Raises:
        DataError: no manifest (not a finished build), a build of another format, or a
            file missing or changed.
    """
    from twotower.storage import read_json

    folder = Path(folder)
    manifest = read_json(folder / MANIFEST, "not a finished data build (no manifest.json)")
    if manifest.get("format") != FORMAT:
        raise DataError(
            f"{folder}: a data build of format {manifest.get('format')!r}; this version reads "
            f"format {FORMAT}: build it again (twotower data build)"
        )
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path}: listed in the build's manifest but missing")
        if sha256_file(path) != expected["sha256"]:
            raise DataError(f"{path}: checksum mismatch; the build's file was changed")
    return manifest


def built_stream(stream: StreamConfig) -> StreamConfig:
    """``stream`` with a build's files and columns in place of ``built`` (checked by
    ``read_manifest``)."""
    folder = stream.built
    if folder is None:
        return stream
    return dataclasses.replace(stream, **stream_files(folder, read_manifest(folder)["columns"]))


def stream_files(folder: Path, roles: dict[str, str]) -> dict[str, Any]:
    """The ``StreamConfig`` fields that read the build in ``folder``, whose columns
    for each role (``output_columns``' roles) are ``roles``."""
    return {
        "built": None,
        "train": folder / "train",
        "valid": folder / "valid.parquet",
        "test": folder / "test.parquet",
        "items": folder / "items.parquet",
        "query_id": roles[QUERY_ID],
        "item_id": roles[ITEM_ID],
        "weight": roles.get(WEIGHT),
    }


def _part_of(path: str) -> str | None:
    part = path.split("/")[0].removesuffix(".parquet")
    return part if part in SPLIT_NAMES else None


def _load_interactions(con: Any, data: DataConfig, features: dict[str, list[str]]) -> None:
    """Table ``interactions``: the canonical columns and each row's ``position``; tables
    ``query_table`` and ``item_table``: each side's key and ``features``' columns."""
    spec = data.interactions
    assert spec is not None
    roles = {column: canonical for canonical, column in interaction_roles(spec).items()}
    sources = interaction_sources(data)
    selects = []
    for table, given in sources:
        relation = _scan(table)
        columns = _columns(con, relation)
        missing = [c for c in roles if c not in columns]
        if missing:
            raise DataError(f"{table.path}: no column(s) {missing}; it has {columns}")
        select = ", ".join(f'"{c}" AS "{canonical}"' for c, canonical in roles.items())
        if given is not None:
            select += f", {given}::TINYINT AS {PART}"
        selects.append(f"SELECT {select} FROM {relation}")
    con.execute("CREATE TABLE raw AS " + " UNION ALL ".join(selects))
    kind = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE raw)").fetchall())
    if kind.get(TIMESTAMP, "").startswith(("TIMESTAMP", "DATE")):  # seconds, as in memory
        con.execute(
            f'ALTER TABLE raw ALTER "{TIMESTAMP}" TYPE BIGINT USING floor(epoch("{TIMESTAMP}"))'
        )
    for column in (QUERY_ID, ITEM_ID):
        empty = con.execute(f'SELECT count(*) FROM raw WHERE "{column}" IS NULL').fetchone()[0]
        if empty:
            raise DataError(f"{spec.path}: {empty} interaction(s) have an empty {column}")
    if con.execute("SELECT count(*) FROM raw").fetchone()[0] == 0:
        raise DataError(f"{spec.path}: the table has no rows (no interactions)")
    for side, table_spec in (("query", data.queries), ("item", data.items)):
        _link_side(con, side, table_spec, features.get(side, []), data.on_missing_rows, spec)
    keep = ""
    if data.min_weight is not None:
        if not spec.weight:
            raise DataError(f"data.min_weight is set but {spec.path} has no weight column")
        keep = f'WHERE "{WEIGHT}" >= {float(data.min_weight)!r}'
    con.execute(
        f"CREATE TABLE interactions AS SELECT *, (row_number() OVER (ORDER BY rowid) - 1) "
        f"AS {POSITION} FROM raw {keep}"
    )
    con.execute("DROP TABLE raw")


def interaction_roles(spec: InteractionsConfig) -> dict[str, str]:
    """The interactions' column for each canonical role (query and item id, and the
    timestamp and weight where named)."""
    roles = {QUERY_ID: spec.query_id, ITEM_ID: spec.item_id}
    if spec.timestamp:
        roles[TIMESTAMP] = spec.timestamp
    if spec.weight:
        roles[WEIGHT] = spec.weight
    return roles


def interaction_sources(data: DataConfig) -> list[tuple[TableSpec, int | None]]:
    """The interaction files and, with the user's own split, each one's part."""
    assert data.interactions is not None
    if data.valid is None and data.test is None:
        return [(data.interactions, None)]
    if data.valid is None or data.test is None:
        raise DataError("give both data.valid and data.test, or neither")
    return [(data.interactions, 0), (data.valid, 1), (data.test, 2)]


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


SIDE_TABLES = {"query": "query_table", "item": "item_table"}


def _link_side(
    con: Any,
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
        con.execute(
            f'CREATE TABLE {name} AS SELECT DISTINCT "{canonical}" AS key FROM raw ORDER BY 1'
        )
        return
    relation = _scan(table)
    present = _columns(con, relation)
    wanted = [table.key, *[c for c in columns if c != table.key]]
    missing = [c for c in wanted if c not in present]
    if missing:
        raise DataError(f"{table.path}: no column(s) {missing}; it has {present}")
    select = ", ".join(f'"{c}" AS key' if c == table.key else _quoted_name(c) for c in wanted)
    con.execute(f"CREATE TABLE {name} AS SELECT {select} FROM {relation}")
    nulls, rows, distinct = con.execute(
        f"SELECT count(*) - count(key), count(*), count(DISTINCT key) FROM {name}"
    ).fetchone()
    if nulls:
        raise DataError(f"{table.path}: {nulls} row(s) with no {table.key!r}")
    if distinct != rows:
        dup, times = con.execute(
            f"SELECT key, count(*) FROM {name} GROUP BY key HAVING count(*) > 1 LIMIT 1"
        ).fetchone()
        raise duplicate_key_error(table, side, dup, times)
    key_type = con.execute(f"SELECT typeof(key) FROM {name} LIMIT 1").fetchone()[0]
    id_type = con.execute(f'SELECT typeof("{canonical}") FROM raw LIMIT 1').fetchone()[0]
    if id_type != key_type:  # cast the ids, as in memory: a scan and a column rewrite
        bad = con.execute(
            f'SELECT "{canonical}", rowid FROM raw WHERE TRY_CAST("{canonical}" AS {key_type}) '
            f"IS NULL LIMIT 1"
        ).fetchone()
        if bad is not None:
            raise DataError(
                f"{interactions.path}: interaction row {bad[1]} (0-based): {id_column} "
                f"{bad[0]!r} does not convert to {key_type}, the type of {table.path}'s keys "
                "(give both files ids of one type)"
            )
        con.execute(f'ALTER TABLE raw ALTER "{canonical}" TYPE {key_type}')
    unknown = f'SELECT DISTINCT "{canonical}" FROM raw ANTI JOIN {name} ON "{canonical}" = key'
    count = con.execute(f"SELECT count(*) FROM ({unknown})").fetchone()[0]
    if not count:
        return
    shown = ", ".join(repr(r[0]) for r in con.execute(f"{unknown} ORDER BY 1 LIMIT 5").fetchall())
    missing_rows(policy, side, count, shown, interactions.path, table.path)
    if policy == "drop":
        con.execute(f'DELETE FROM raw WHERE "{canonical}" IN ({unknown})')
    elif policy == "impute":
        con.execute(f"INSERT INTO {name} (key) {unknown} ORDER BY 1")


def _scan(table: TableSpec) -> str:
    """A DuckDB table function reading ``table``, rows in source order."""
    path = Path(table.path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if table.is_parquet:
        listed = ", ".join(_quoted(str(f)) for f in parquet_files(path))
        return f"read_parquet([{listed}])"
    options = [
        f"delim = {_quoted(table.delimiter)}",
        f"header = {str(table.header).lower()}",
        f"encoding = {_quoted(_DUCKDB_ENCODINGS.get(table.encoding.lower(), table.encoding))}",
        f"quote = {_quoted(table.quote_char or '')}",
        f"ignore_errors = {str(table.skip_bad_rows).lower()}",
    ]
    if table.columns:
        options.append("names = [" + ", ".join(_quoted(c) for c in table.columns) + "]")
    return f"read_csv({_quoted(str(path))}, {', '.join(options)})"


def parquet_files(path: Path) -> list[Path]:
    """The Parquet files of a file or folder, in name order, each checked readable and
    not empty from its footer alone.

    Raises:
        DataError: naming the file: no .parquet files, not Parquet (corrupt or
            truncated), or without rows (an empty partition).
    """
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: a folder with no .parquet files")
    for file in files:
        try:
            rows = pq.ParquetFile(file).metadata.num_rows
        except (OSError, pa.ArrowException) as err:
            raise DataError(f"{file}: not a readable Parquet file ({err})") from None
        if rows == 0:
            raise DataError(f"{file}: an empty Parquet file (no rows); remove it or refill it")
    return files


_DUCKDB_ENCODINGS = {"latin-1": "latin-1", "iso-8859-1": "latin-1", "utf8": "utf-8"}


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _columns(con: Any, relation: str) -> list[str]:
    try:
        return [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()]
    except Exception as err:  # duckdb's errors name the file; keep their first line
        raise DataError(str(err).splitlines()[0]) from None


def _assign_parts(con: Any, split: SplitConfig, staging: Path) -> None:
    """Adds column ``part`` (0 train, 1 valid, 2 test) to ``interactions``."""
    columns = [r[0] for r in con.execute("DESCRIBE interactions").fetchall()]
    has_time = TIMESTAMP in columns
    if split.method == "given":
        if PART not in columns:
            raise DataError(
                "split method 'given' needs your own files: set data.valid and data.test "
                "beside data.interactions"
            )
        return
    if split.method == "leave_last_out":
        order = f'"{TIMESTAMP}", {POSITION}' if has_time else POSITION
        part = """CASE
            WHEN n - 1 - rank = 0 AND n >= 2 THEN 2
            WHEN n - 1 - rank = 1 AND n >= 3 THEN 1
            ELSE 0 END"""
        ranked = f"""SELECT *, row_number() OVER (PARTITION BY "{QUERY_ID}" ORDER BY {order}) - 1
            AS rank, count(*) OVER (PARTITION BY "{QUERY_ID}") AS n FROM interactions"""
    elif split.method == "random":
        rows = con.execute("SELECT count(*) FROM interactions").fetchone()[0]
        write_draws(rows, split.seed, staging / "draws.parquet")
        train, valid = split.ratios[0], split.ratios[0] + split.ratios[1]
        part = f"""CASE
            WHEN rank < round_even(n * {train!r}::DOUBLE, 0) THEN 0
            WHEN rank < round_even(n * {valid!r}::DOUBLE, 0) THEN 1
            ELSE 2 END"""
        ranked = f"""SELECT i.*, row_number() OVER (PARTITION BY "{QUERY_ID}" ORDER BY d.u,
            i.{POSITION}) - 1 AS rank, count(*) OVER (PARTITION BY "{QUERY_ID}") AS n
            FROM interactions i JOIN read_parquet({_quoted(str(staging / "draws.parquet"))}) d
            ON i.{POSITION} = d.{POSITION}"""
    else:  # time
        if not has_time:
            raise DataError("split method 'time' needs a timestamp column")
        _, r_valid, r_test = split.ratios
        test_from, valid_from = split.test_from, split.valid_from
        if test_from is None:
            test_from = _quantile(con, 1 - r_test)
        if valid_from is None:
            valid_from = _quantile(con, 1 - r_test - r_valid)
        if valid_from > test_from:
            raise DataError(f"split: valid_from ({valid_from}) is after test_from ({test_from})")
        part = f"""CASE WHEN "{TIMESTAMP}" >= {test_from!r} THEN 2
            WHEN "{TIMESTAMP}" >= {valid_from!r} THEN 1 ELSE 0 END"""
        ranked = "SELECT * FROM interactions"
    con.execute(
        f"CREATE TABLE parted AS SELECT * EXCLUDE (rank, n), ({part})::TINYINT AS {PART} "
        f"FROM ({ranked})"
        if split.method != "time"
        else f"CREATE TABLE parted AS SELECT *, ({part})::TINYINT AS {PART} FROM ({ranked})"
    )
    con.execute("DROP TABLE interactions")
    con.execute("ALTER TABLE parted RENAME TO interactions")


def _quantile(con: Any, q: float) -> float:
    """numpy's default (linear) quantile of the timestamps, as ``np.quantile``."""
    count = con.execute("SELECT count(*) FROM interactions").fetchone()[0]

    def pair(k: int) -> list[float]:
        query = f'SELECT "{TIMESTAMP}"::DOUBLE FROM interactions ORDER BY 1 LIMIT 2 OFFSET {k}'
        return [row[0] for row in con.execute(query).fetchall()]

    return linear_quantile(count, q, pair)


def write_draws(rows: int, seed: int, path: Path) -> None:
    """``path``: (position, u) for positions 0..rows-1, u numpy's
    ``default_rng(seed).random`` draw for that position: the stream the in-memory random
    split draws, written in chunks."""
    rng = np.random.default_rng(seed)
    schema = pa.schema([(POSITION, pa.int64()), ("u", pa.float64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, _DRAW_CHUNK):
            count = min(_DRAW_CHUNK, rows - start)
            positions = np.arange(start, start + count, dtype=np.int64)
            table = pa.table({POSITION: positions, "u": rng.random(count)}, schema=schema)
            writer.write_table(table)


def linear_quantile(count: int, q: float, sorted_pair: Any) -> float:
    """numpy's default (linear) quantile ``q`` of ``count`` values, given
    ``sorted_pair(k)``: the k-th and (k+1)-th smallest values (the second may be absent)."""
    h = (count - 1) * q
    low = int(np.floor(h))
    pair = sorted_pair(low)
    a = pair[0]
    b = pair[1] if len(pair) > 1 else a
    return float(np.quantile(np.array([a, b], dtype=np.float64), h - low)) if b != a else float(a)


@dataclasses.dataclass(frozen=True)
class OutputColumns:
    """The columns a build writes, under the user's own names.

    Attributes:
        roles: canonical column -> the interactions' name for it (``user_id``, ...).
        query: the query features' columns joined into every row: name -> where it
            comes from (``key``: the query id; else the query table's column).
        item: the item features' columns of ``items.parquet``, likewise.
    """

    roles: dict[str, str]
    query: dict[str, str]
    item: dict[str, str]

    def rows(self, table: str) -> str:
        """The SELECT list of an output row: the roles renamed, ``position``, and the
        query features (from ``q``, the query table joined)."""
        parts = [f'{table}."{c}" AS {_quoted_name(n)}' for c, n in self.roles.items()]
        parts.append(f"{table}.{POSITION}")
        return ", ".join([*parts, *self._query_features(table)])

    def query_row(self, table: str) -> str:
        """The SELECT list of a query's row: its id and its features (``q`` joined)."""
        first = f'{table}."{QUERY_ID}" AS {_quoted_name(self.roles[QUERY_ID])}'
        return ", ".join([first, *self._query_features(table)])

    def _query_features(self, table: str) -> list[str]:
        return [
            f'{table}."{QUERY_ID}" AS {_quoted_name(n)}'
            if source == "key"
            else f"q.{_quoted_name(source)} AS {_quoted_name(n)}"
            for n, source in self.query.items()
        ]


def output_columns(data: DataConfig, columns: dict[str, list[str]]) -> OutputColumns:
    """Which columns a build writes, and from where (see ``OutputColumns``)."""
    spec = data.interactions
    assert spec is not None
    roles = interaction_roles(spec)
    sides = {}
    for side, table, id_column in (
        ("query", data.queries, spec.query_id),
        ("item", data.items, spec.item_id),
    ):
        key = table.key if table is not None else id_column
        sides[side] = {c: "key" if c == key else c for c in columns.get(side, []) if c != id_column}
    return OutputColumns(roles, sides["query"], sides["item"])


def _write_items(
    con: Any, staging: Path, options: BuildOptions, outputs: OutputColumns
) -> dict[str, dict[str, Any]]:
    """``items.parquet``: the corpus, keyed by the interactions' item id column, with the
    item features' columns."""
    parts = [f"key AS {_quoted_name(outputs.roles[ITEM_ID])}"]
    parts += [
        f"key AS {_quoted_name(n)}"
        if source == "key"
        else f"{_quoted_name(source)} AS {_quoted_name(n)}"
        for n, source in outputs.item.items()
    ]
    query = f"SELECT {', '.join(parts)} FROM item_table ORDER BY rowid"
    reader = con.sql(query).to_arrow_reader(options.row_group_rows)
    return write_stream(reader, staging, "items", None, options.row_group_rows)


def _write_parts(
    con: Any,
    staging: Path,
    options: BuildOptions,
    histories: Histories,
    rule: str,
    outputs: OutputColumns,
) -> dict[str, dict[str, Any]]:
    """Each part as Parquet in source order, streamed from DuckDB in Arrow batches, the
    training rows with their histories; returns each file's rows and sha256."""
    files: dict[str, dict[str, Any]] = {}
    (staging / "train").mkdir()
    has_time = TIMESTAMP in [r[0] for r in con.execute("DESCRIBE interactions").fetchall()]
    recency = f'"{TIMESTAMP}", {POSITION}' if has_time else POSITION
    longest = max(histories.lengths.values(), default=0)
    if rule == "mask_target" and longest:
        _latest_table(con, "latest_train", "0", longest, recency)
    # as in memory, where the parts known by then are concatenated in order: between
    # equal timestamps (or without any), a training row is older than a validation row
    known = f'"{TIMESTAMP}", {PART}, {POSITION}' if has_time else f"{PART}, {POSITION}"
    for target, name in enumerate(STEPS, start=1):
        _step_table(con, name, target, longest, known)
    for index, name in enumerate(SPLIT_NAMES):
        columns, source = "", "interactions"
        if name == "train" and histories.lengths:
            columns = "".join(
                f", {_history(rule, length, recency)} AS {_quoted_name(column)}"
                for column, length in histories.lengths.items()
            )
            if rule == "mask_target":
                source = f'interactions LEFT JOIN latest_train USING ("{QUERY_ID}")'
        elif histories.lengths:  # a held-out row: its query's history as of its step
            latest = f"latest_{name}"
            columns = "".join(
                f", coalesce({latest}.items[1:{length}], []) AS {_quoted_name(column)}"
                for column, length in histories.lengths.items()
            )
            source = f'interactions LEFT JOIN {latest} USING ("{QUERY_ID}")'
        source += f' LEFT JOIN query_table q ON interactions."{QUERY_ID}" = q.key'
        query = (
            f"SELECT {outputs.rows('interactions')}{columns} FROM {source} "
            f"WHERE {PART} = {index} ORDER BY {POSITION}"
        )
        reader = con.sql(query).to_arrow_reader(options.row_group_rows)
        per_file = options.rows_per_part if name == "train" else None
        written = write_stream(reader, staging, name, per_file, options.row_group_rows)
        if not written:
            raise DataError(f"the {name} split has no interactions after splitting")
        files.update(written)
    return files


def _history(rule: str, length: int, recency: str) -> str:
    """The SQL of a training row's history list: item ids, most recent first."""
    if rule == "before_event":
        earlier = (
            f'list("{ITEM_ID}") OVER (PARTITION BY "{QUERY_ID}" ORDER BY {recency} '
            f"ROWS BETWEEN {length} PRECEDING AND 1 PRECEDING)"
        )
        return f"list_reverse(coalesce({earlier}, []))"
    # mask_target: the query's latest items, the target's own entries null
    return (
        f"list_transform(coalesce(latest_train.items[1:{length}], []), "
        f'lambda x: CASE WHEN x = interactions."{ITEM_ID}" THEN NULL ELSE x END)'
    )


def _latest_table(con: Any, table: str, parts: str, length: int, recency: str) -> None:
    """Table ``table``: each query's latest ``length`` items among ``parts``, most
    recent first (column ``items``)."""
    descending = ", ".join(f"{c} DESC" for c in recency.split(", "))
    con.execute(
        f'CREATE OR REPLACE TABLE {table} AS SELECT "{QUERY_ID}", '
        f'list("{ITEM_ID}" ORDER BY {descending})[1:{length}] AS items '
        f"FROM interactions WHERE {PART} IN ({parts}) GROUP BY ALL"
    )


def _step_table(con: Any, name: str, target: int, length: int, recency: str) -> None:
    """Table ``latest_{name}``: every query with interactions up to part ``target``
    (1: valid, 2: test, 3: all, which has no part of its own), with what was known
    before that part (its latest ``length`` items, most recent first, as ``items``; its
    distinct items, ``seen``), the part's own distinct items (``targets``) and its
    training rows (``train_interactions``)."""
    known = f"WHERE {PART} < {target}"
    descending = ", ".join(f"{c} DESC" for c in recency.split(", "))
    items = (
        f'coalesce(list("{ITEM_ID}" ORDER BY {descending}) FILTER ({known}), [])[1:{length}] '
        "AS items, "
        if length
        else ""
    )
    con.execute(
        f'CREATE OR REPLACE TABLE latest_{name} AS SELECT "{QUERY_ID}", {items}'
        f'list_sort(coalesce(list(DISTINCT "{ITEM_ID}") FILTER ({known}), [])) AS seen, '
        f'list_sort(coalesce(list(DISTINCT "{ITEM_ID}") FILTER (WHERE {PART} = {target}), [])) '
        f"AS targets, count(*) FILTER (WHERE {PART} = 0) AS {TRAIN_INTERACTIONS} "
        f"FROM interactions WHERE {PART} <= {target} GROUP BY ALL"
    )


def _write_queries(
    con: Any, staging: Path, options: BuildOptions, histories: Histories, outputs: OutputColumns
) -> dict[str, dict[str, Any]]:
    """``queries_valid.parquet`` and ``queries_test.parquet`` (``QUERY_COLUMNS``): every
    query with interactions up to that part, by id, from ``_step_table``'s tables."""
    files: dict[str, dict[str, Any]] = {}
    for name in STEPS:
        columns = "".join(
            f", s.items[1:{length}] AS {_quoted_name(column)}"
            for column, length in histories.lengths.items()
        )
        query = (
            f"SELECT {outputs.query_row('s')}{columns}, s.seen, s.targets, "
            f"s.{TRAIN_INTERACTIONS} FROM latest_{name} s "
            f'LEFT JOIN query_table q ON s."{QUERY_ID}" = q.key ORDER BY s."{QUERY_ID}"'
        )
        reader = con.sql(query).to_arrow_reader(options.row_group_rows)
        files.update(write_stream(reader, staging, f"queries_{name}", None, options.row_group_rows))
    return files


def _quoted_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def write_stream(
    reader: pa.RecordBatchReader, staging: Path, name: str, per_file: int | None, group: int
) -> dict[str, dict[str, Any]]:
    """Writes the reader's rows as ``name.parquet``, or with ``per_file`` as
    ``name/part-NNNNN.parquet`` files of that many rows; row groups of ``group`` rows."""
    files = _Files(staging, name, per_file, group)
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in reader:
        pending.append(batch)
        count += batch.num_rows
        if count >= group:
            table = pa.Table.from_batches(pending, schema=reader.schema)
            whole = count // group * group
            for start in range(0, whole, group):
                files.write(table.slice(start, group))
            rest = table.slice(whole)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        files.write(pa.Table.from_batches(pending, schema=reader.schema))
    return files.close()


class _Files:
    """The Parquet files of one part, a new one every ``per_file`` rows."""

    def __init__(self, staging: Path, name: str, per_file: int | None, group: int) -> None:
        self.staging, self.name, self.per_file, self.group = staging, name, per_file, group
        self.done: dict[str, dict[str, Any]] = {}
        self.writer: pq.ParquetWriter | None = None
        self.path = staging
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            number = len(self.done)
            relative = (
                f"{self.name}/part-{number:05d}.parquet"
                if self.per_file
                else f"{self.name}.parquet"
            )
            self.path = self.staging / relative
            self.writer, self.rows = pq.ParquetWriter(self.path, table.schema), 0
        self.writer.write_table(table, row_group_size=self.group)
        self.rows += table.num_rows
        if self.per_file and self.rows >= self.per_file:
            self._finish()

    def close(self) -> dict[str, dict[str, Any]]:
        self._finish()
        return self.done

    def _finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
            relative = self.path.relative_to(self.staging).as_posix()
            self.done[relative] = {"rows": self.rows, "sha256": sha256_file(self.path)}
            self.writer = None
