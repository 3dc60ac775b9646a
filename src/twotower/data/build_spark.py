"""``twotower data build --engine spark``: the DuckDB build's steps on Apache Spark.

The same split and histories as ``twotower.data.build`` (tested equal), for data that
outgrows one machine: Spark SQL on a cluster (``master``; ``local[2]`` runs it here).
Source order, which the in-memory split reads, is each file's row order, files in name
order: every file is read whole by one task (``spark.sql.files.maxPartitionBytes`` set
past any file), so ordering by (file name, ``monotonically_increasing_id``) gives it.
Spark writes each part to a scratch folder in ``position`` order; the driver then streams
those files through pyarrow into the same layout the DuckDB build writes (parts of
``rows_per_part`` rows, row groups of ``row_group_rows``), in bounded memory.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from twotower.data.build import (
    PART,
    POSITION,
    SIDE_TABLES,
    STEPS,
    TRAIN_INTERACTIONS,
    BuildOptions,
    Histories,
    OutputColumns,
    duplicate_key_error,
    interaction_roles,
    interaction_sources,
    linear_quantile,
    missing_rows,
    no_table_error,
    output_columns,
    parquet_files,
    write_draws,
    write_stream,
)
from twotower.data.config import (
    DataConfig,
    FeatureTableConfig,
    InteractionsConfig,
    SplitConfig,
    TableSpec,
)
from twotower.data.dataset import ITEM_ID, QUERY_ID, TIMESTAMP, WEIGHT
from twotower.data.splits import SPLIT_NAMES
from twotower.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def spark_build(
    data: DataConfig,
    split: SplitConfig,
    staging: Path,
    options: BuildOptions,
    histories: Histories,
    master: str,
    columns: dict[str, list[str]],
) -> tuple[dict[str, dict[str, Any]], str]:
    """The build on Spark, in ``staging``; returns the files written and the history
    rule applied."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError(
            "--engine spark needs PySpark (pip install 'twotower[spark]') and Java 17 or later"
        ) from None
    scratch = staging / "spark"
    created = SparkSession.getActiveSession() is None
    builder = (
        SparkSession.builder.master(master)
        .appName("twotower data build")
        .config("spark.ui.enabled", "false")
        .config("spark.local.dir", str(scratch / "local"))
    )
    spark = builder.getOrCreate()
    # each file read whole by one task, in order; times in UTC
    spark.conf.set("spark.sql.files.maxPartitionBytes", str(1 << 50))
    spark.conf.set("spark.sql.files.openCostInBytes", str(1 << 50))
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    if options.threads:
        spark.conf.set("spark.sql.shuffle.partitions", str(options.threads * 2))
    if created:
        spark.sparkContext.setLogLevel("ERROR")
    try:
        _load_interactions(spark, data, columns)
        has_time = TIMESTAMP in spark.table("interactions").columns
        _assign_parts(spark, split, staging, has_time)
        rule = histories.resolved_rule(has_time)
        outputs = output_columns(data, columns)
        files = _write_parts(spark, scratch, staging, options, histories, rule, has_time, outputs)
        files.update(_write_items(spark, scratch, staging, options, outputs))
        files.update(_write_queries(spark, scratch, staging, options, histories, outputs))
    finally:
        spark.catalog.clearCache()
        if created:
            spark.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        (staging / "draws.parquet").unlink(missing_ok=True)
    return files, rule


def _read(spark: Any, table: TableSpec) -> Any:
    """A DataFrame of ``table`` with ``_file`` and ``_row`` (its order within the file)."""
    from pyspark.sql import functions as F

    path = Path(table.path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        if table.is_parquet:
            frame = spark.read.parquet(*[str(f) for f in parquet_files(path)])
        else:
            reader = spark.read.option("header", table.header).option("sep", table.delimiter)
            reader = reader.option("encoding", table.encoding).option("inferSchema", True)
            reader = reader.option("quote", table.quote_char or "")
            reader = reader.option("mode", "DROPMALFORMED" if table.skip_bad_rows else "FAILFAST")
            frame = reader.csv(str(path))
            if table.columns:
                frame = frame.toDF(*table.columns)
        frame.schema  # noqa: B018  (resolves the files now, so errors name them here)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: {str(err).splitlines()[0]}") from None
    return frame.withColumn("_file", F.input_file_name()).withColumn(
        "_row", F.monotonically_increasing_id()
    )


def _load_interactions(spark: Any, data: DataConfig, features: dict[str, list[str]]) -> None:
    """View ``interactions``: the canonical columns and each row's ``position``; views
    ``query_table`` and ``item_table``: each side's key and ``features``' columns."""
    from pyspark.sql import functions as F

    spec = data.interactions
    assert spec is not None
    roles = {column: canonical for canonical, column in interaction_roles(spec).items()}
    sources = interaction_sources(data)
    frames = []
    for number, (table, given) in enumerate(sources):
        frame = _read(spark, table)
        missing = [c for c in roles if c not in frame.columns]
        if missing:
            shown = [c for c in frame.columns if not c.startswith("_")]
            raise DataError(f"{table.path}: no column(s) {missing}; it has {shown}")
        columns = [F.col(f"`{c}`").alias(canonical) for c, canonical in roles.items()]
        columns += [F.lit(number).alias("_source"), "_file", "_row"]
        if given is not None:
            columns.append(F.lit(given).cast("tinyint").alias(PART))
        frames.append(frame.select(*columns))
    raw = frames[0]
    for frame in frames[1:]:
        raw = raw.unionByName(frame)
    raw.createOrReplaceTempView("raw")
    for column in (QUERY_ID, ITEM_ID):
        empty = spark.sql(f"SELECT count(*) FROM raw WHERE `{column}` IS NULL").first()[0]
        if empty:
            raise DataError(f"{spec.path}: {empty} interaction(s) have an empty {column}")
    if spark.sql("SELECT count(*) FROM raw").first()[0] == 0:
        raise DataError(f"{spec.path}: the table has no rows (no interactions)")
    kind = dict(raw.dtypes).get(TIMESTAMP, "")
    if kind.startswith(("timestamp", "date")):  # seconds, as in memory
        raw = raw.withColumn(TIMESTAMP, F.floor(F.unix_timestamp(TIMESTAMP)).cast("bigint"))
        raw.createOrReplaceTempView("raw")
    for side, table in (("query", data.queries), ("item", data.items)):
        _link_side(spark, side, table, features.get(side, []), data.on_missing_rows, spec)
    keep = ""
    if data.min_weight is not None:
        if not spec.weight:
            raise DataError(f"data.min_weight is set but {spec.path} has no weight column")
        keep = f"WHERE `{WEIGHT}` >= {float(data.min_weight)!r}"
    frame = spark.sql(
        f"SELECT *, CAST(row_number() OVER (ORDER BY _source, _file, _row) - 1 AS BIGINT) "
        f"AS {POSITION} "
        f"FROM raw {keep}"
    ).drop("_source", "_file", "_row")
    frame.cache().createOrReplaceTempView("interactions")


def _link_side(
    spark: Any,
    side: str,
    table: FeatureTableConfig | None,
    columns: list[str],
    policy: str,
    interactions: InteractionsConfig,
) -> None:
    """View ``query_table`` / ``item_table``, as the DuckDB build's ``_link_side``: the
    interactions' ids cast to the key's type, ids without a row an error, dropped or
    imputed; without a table, the side's ids alone, sorted."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    canonical = QUERY_ID if side == "query" else ITEM_ID
    id_column = interactions.query_id if side == "query" else interactions.item_id
    name = SIDE_TABLES[side]
    raw = spark.table("raw")
    if table is None:
        error = no_table_error(side, columns, id_column)
        if error is not None:
            raise error
        ids = raw.select(F.col(canonical).alias("key")).distinct()
        ids.withColumn("_order", F.col("key")).cache().createOrReplaceTempView(name)
        return
    frame = _read(spark, table)
    present = [c for c in frame.columns if not c.startswith("_")]
    wanted = [table.key, *[c for c in columns if c != table.key]]
    missing = [c for c in wanted if c not in present]
    if missing:
        raise DataError(f"{table.path}: no column(s) {missing}; it has {present}")
    frame = frame.select(
        *[F.col(f"`{c}`").alias("key") if c == table.key else F.col(f"`{c}`") for c in wanted],
        F.struct("_file", "_row").alias("_order"),
    ).cache()
    nulls = frame.where(F.col("key").isNull()).count()
    if nulls:
        raise DataError(f"{table.path}: {nulls} row(s) with no {table.key!r}")
    dup = frame.groupBy("key").count().where("count > 1").first()
    if dup is not None:
        raise duplicate_key_error(table, side, dup["key"], dup["count"])
    key_type = dict(frame.dtypes)["key"]
    converted = raw.withColumn("_cast", F.col(canonical).cast(key_type))
    bad = converted.where(F.col("_cast").isNull()).orderBy("_source", "_file", "_row").first()
    if bad is not None:
        raise DataError(
            f"{interactions.path}: {id_column} {bad[canonical]!r} does not convert to "
            f"{key_type}, the type of {table.path}'s keys (give both files ids of one type)"
        )
    raw = converted.withColumn(canonical, F.col("_cast")).drop("_cast")
    unknown = raw.join(frame, raw[canonical] == frame["key"], "left_anti").select(canonical)
    unknown = unknown.distinct().orderBy(canonical)
    count = unknown.count()
    if count:
        shown = ", ".join(repr(r[0]) for r in unknown.limit(5).collect())
        missing_rows(policy, side, count, shown, interactions.path, table.path)
        if policy == "drop":
            gone = unknown.withColumnRenamed(canonical, "_gone")
            raw = raw.join(gone, raw[canonical] == F.col("_gone"), "left_anti")
        else:  # impute: rows of missing features, after the file's
            extra = unknown.select(F.col(canonical).alias("key"))
            types = dict(frame.dtypes)
            for column in frame.columns[1:]:
                if column != "_order":
                    extra = extra.withColumn(column, F.lit(None).cast(types[column]))
            after = F.row_number().over(Window.orderBy("key")).cast("bigint")
            order = F.struct(F.lit("~").alias("_file"), after.alias("_row"))
            frame = frame.unionByName(extra.withColumn("_order", order))
    raw.cache().createOrReplaceTempView("raw")
    frame.createOrReplaceTempView(name)


def _assign_parts(spark: Any, split: SplitConfig, staging: Path, has_time: bool) -> None:
    """Adds column ``part`` (0 train, 1 valid, 2 test) to ``interactions``."""
    columns = spark.table("interactions").columns
    if split.method == "given":
        if PART not in columns:
            raise DataError(
                "split method 'given' needs your own files: set data.valid and data.test "
                "beside data.interactions"
            )
        return
    keep = ", ".join(f"`{c}`" for c in columns)
    if split.method == "leave_last_out":
        order = f"`{TIMESTAMP}`, {POSITION}" if has_time else POSITION
        part = """CASE WHEN n - 1 - rank = 0 AND n >= 2 THEN 2
            WHEN n - 1 - rank = 1 AND n >= 3 THEN 1 ELSE 0 END"""
        ranked = f"""SELECT i.*, row_number() OVER (PARTITION BY `{QUERY_ID}` ORDER BY {order})
            - 1 AS rank, count(*) OVER (PARTITION BY `{QUERY_ID}`) AS n FROM interactions i"""
    elif split.method == "random":
        rows = spark.table("interactions").count()
        write_draws(rows, split.seed, staging / "draws.parquet")
        spark.read.parquet(str(staging / "draws.parquet")).createOrReplaceTempView("draws")
        train, valid = split.ratios[0], split.ratios[0] + split.ratios[1]
        part = f"""CASE WHEN rank < bround(n * CAST({train!r} AS DOUBLE), 0) THEN 0
            WHEN rank < bround(n * CAST({valid!r} AS DOUBLE), 0) THEN 1 ELSE 2 END"""
        ranked = f"""SELECT i.*, row_number() OVER (PARTITION BY i.`{QUERY_ID}` ORDER BY d.u,
            i.{POSITION}) - 1 AS rank, count(*) OVER (PARTITION BY i.`{QUERY_ID}`) AS n
            FROM interactions i JOIN draws d ON i.{POSITION} = d.{POSITION}"""
    else:  # time
        if not has_time:
            raise DataError("split method 'time' needs a timestamp column")
        _, r_valid, r_test = split.ratios
        test_from, valid_from = split.test_from, split.valid_from
        if test_from is None:
            test_from = _quantile(spark, 1 - r_test)
        if valid_from is None:
            valid_from = _quantile(spark, 1 - r_test - r_valid)
        if valid_from > test_from:
            raise DataError(f"split: valid_from ({valid_from}) is after test_from ({test_from})")
        part = f"""CASE WHEN `{TIMESTAMP}` >= {test_from!r} THEN 2
            WHEN `{TIMESTAMP}` >= {valid_from!r} THEN 1 ELSE 0 END"""
        ranked = "SELECT * FROM interactions i"
    frame = spark.sql(f"SELECT {keep}, CAST({part} AS TINYINT) AS {PART} FROM ({ranked}) i")
    frame.cache().createOrReplaceTempView("parted")
    frame.count()
    spark.table("parted").createOrReplaceTempView("interactions")


def _quantile(spark: Any, q: float) -> float:
    """numpy's default (linear) quantile of the timestamps, as ``np.quantile``."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    times = spark.table("interactions").select(F.col(TIMESTAMP).cast("double").alias("t"))
    ranked = times.withColumn("k", F.row_number().over(Window.orderBy("t")) - 1)

    def pair(k: int) -> list[float]:
        rows = ranked.where(F.col("k").between(k, k + 1)).orderBy("k").collect()
        return [row["t"] for row in rows]

    return linear_quantile(times.count(), q, pair)


def _write_parts(
    spark: Any,
    scratch: Path,
    staging: Path,
    options: BuildOptions,
    histories: Histories,
    rule: str,
    has_time: bool,
    outputs: OutputColumns,
) -> dict[str, dict[str, Any]]:
    """Each part in source order, the training rows with their histories."""
    recency = f"`{TIMESTAMP}`, {POSITION}" if has_time else POSITION
    keep = outputs.rows("i").replace('"', "`")
    longest = max(histories.lengths.values(), default=0)
    if rule == "mask_target" and longest:
        _latest_view(spark, "latest_train", longest, has_time)
    for target, name in enumerate(STEPS, start=1):
        _step_view(spark, name, target, longest, has_time)
    files: dict[str, dict[str, Any]] = {}
    (staging / "train").mkdir()
    for index, name in enumerate(SPLIT_NAMES):
        extra, source = "", "interactions i"
        if name == "train" and histories.lengths:
            extra = "".join(
                f", {_history(rule, length, recency)} AS `{column}`"
                for column, length in histories.lengths.items()
            )
            if rule == "mask_target":
                source = (
                    f"interactions i LEFT JOIN latest_train l ON i.`{QUERY_ID}` = l.`{QUERY_ID}`"
                )
        elif histories.lengths:  # a held-out row: its query's history as of its step
            extra = "".join(
                f", slice(coalesce(l.items, array()), 1, {length}) AS `{column}`"
                for column, length in histories.lengths.items()
            )
            source = f"interactions i LEFT JOIN latest_{name} l ON i.`{QUERY_ID}` = l.`{QUERY_ID}`"
        source += f" LEFT JOIN query_table q ON i.`{QUERY_ID}` = q.key"
        frame = spark.sql(f"SELECT {keep}{extra} FROM {source} WHERE i.{PART} = {index}")
        written = _through_scratch(frame, scratch / name, staging, name, options, name == "train")
        if not written:
            raise DataError(f"the {name} split has no interactions after splitting")
        files.update(written)
    return files


def _history(rule: str, length: int, recency: str) -> str:
    """The Spark SQL of a training row's history list: item ids, most recent first."""
    if rule == "before_event":
        recency = ", ".join(f"i.{c}" for c in recency.split(", "))
        earlier = (
            f"collect_list(i.`{ITEM_ID}`) OVER (PARTITION BY i.`{QUERY_ID}` ORDER BY {recency} "
            f"ROWS BETWEEN {length} PRECEDING AND 1 PRECEDING)"
        )
        return f"reverse({earlier})"
    return (
        f"transform(slice(coalesce(l.items, array()), 1, {length}), "
        f"x -> CASE WHEN x = i.`{ITEM_ID}` THEN NULL ELSE x END)"
    )


def _latest_view(spark: Any, view: str, length: int, has_time: bool) -> None:
    """View ``view``: each query's latest ``length`` training items, most recent first
    (``items``)."""
    keys = [f"CAST(`{TIMESTAMP}` AS DOUBLE)"] if has_time else []
    fields = ", ".join([*keys, POSITION, f"`{ITEM_ID}`"])
    frame = spark.sql(
        f"SELECT `{QUERY_ID}`, transform(slice(sort_array(collect_list(struct({fields})), "
        f"false), 1, {length}), s -> s.`{ITEM_ID}`) AS items "
        f"FROM interactions WHERE {PART} = 0 GROUP BY `{QUERY_ID}`"
    )
    frame.createOrReplaceTempView(view)


def _step_view(spark: Any, name: str, target: int, length: int, has_time: bool) -> None:
    """View ``latest_{name}``, as the DuckDB build's ``_step_table``: every query with
    interactions up to part ``target``, with its latest ``length`` items and its seen
    items before that part, the part's items and its training rows."""
    keys = [f"CAST(`{TIMESTAMP}` AS DOUBLE)"] if has_time else []
    fields = ", ".join([*keys, PART, POSITION, f"`{ITEM_ID}`"])
    known = f"{PART} < {target}"
    items = (
        f"transform(slice(sort_array(collect_list(CASE WHEN {known} THEN struct({fields}) END), "
        f"false), 1, {length}), s -> s.`{ITEM_ID}`) AS items, "
        if length
        else ""
    )
    frame = spark.sql(
        f"SELECT `{QUERY_ID}`, {items}"
        f"array_sort(collect_set(CASE WHEN {known} THEN `{ITEM_ID}` END)) AS seen, "
        f"array_sort(collect_set(CASE WHEN {PART} = {target} THEN `{ITEM_ID}` END)) AS targets, "
        f"CAST(count(CASE WHEN {PART} = 0 THEN 1 END) AS BIGINT) AS {TRAIN_INTERACTIONS} "
        f"FROM interactions WHERE {PART} <= {target} GROUP BY `{QUERY_ID}`"
    )
    frame.createOrReplaceTempView(f"latest_{name}")


def _write_queries(
    spark: Any,
    scratch: Path,
    staging: Path,
    options: BuildOptions,
    histories: Histories,
    outputs: OutputColumns,
) -> dict[str, dict[str, Any]]:
    """``queries_valid.parquet`` and ``queries_test.parquet``, as the DuckDB build's."""
    files: dict[str, dict[str, Any]] = {}
    row = outputs.query_row("s").replace('"', "`")
    for name in STEPS:
        columns = "".join(
            f", slice(s.items, 1, {length}) AS `{column}`"
            for column, length in histories.lengths.items()
        )
        frame = spark.sql(
            f"SELECT {row}{columns}, s.seen, s.targets, s.{TRAIN_INTERACTIONS} "
            f"FROM latest_{name} s LEFT JOIN query_table q ON s.`{QUERY_ID}` = q.key"
        )
        target = f"queries_{name}"
        files.update(_through_scratch(frame, scratch / target, staging, target, options, False))
    return files


def _write_items(
    spark: Any, scratch: Path, staging: Path, options: BuildOptions, outputs: OutputColumns
) -> dict[str, dict[str, Any]]:
    """``items.parquet``, as the DuckDB build's: the corpus in the item table's order."""
    parts = [f"key AS `{outputs.roles[ITEM_ID]}`"]
    parts += [
        f"key AS `{n}`" if source == "key" else f"`{source}` AS `{n}`"
        for n, source in outputs.item.items()
    ]
    frame = spark.sql(f"SELECT {', '.join(parts)}, _order FROM item_table")
    return _through_scratch(frame, scratch / "items", staging, "items", options, False)


def _through_scratch(
    frame: Any, scratch: Path, staging: Path, name: str, options: BuildOptions, train: bool
) -> dict[str, dict[str, Any]]:
    """Spark writes ``frame`` sorted (by position, or by query id) into ``scratch``; the
    driver streams it into ``staging`` in the DuckDB build's layout."""
    if POSITION in frame.columns:
        frame = frame.orderBy(POSITION)
    elif "_order" in frame.columns:  # the item table's own order
        frame = frame.orderBy("_order").drop("_order")
    else:  # queries, by id
        frame = frame.orderBy(frame.columns[0])
    frame.write.mode("overwrite").parquet(str(scratch))
    parts = sorted(scratch.glob("part-*.parquet"))
    if not parts:
        return {}
    schema = pq.read_schema(parts[0])
    batches = (
        batch
        for part in parts
        for batch in pq.ParquetFile(part).iter_batches(batch_size=options.row_group_rows)
    )
    reader = pa.RecordBatchReader.from_batches(schema, batches)
    per_file = options.rows_per_part if train else None
    return write_stream(reader, staging, name, per_file, options.row_group_rows)
