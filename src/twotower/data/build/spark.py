"""``twotower data build --engine spark``: the build's plan on Apache Spark.

The same steps as on DuckDB (tested equal), for data that outgrows one machine: Spark
SQL on a cluster (``master``; ``local[2]`` runs it here). Source order is each file's
row order, files in name order: every file is read whole by one task
(``spark.sql.files.maxPartitionBytes`` set past any file), so ordering by (source,
file name, ``monotonically_increasing_id``), the helper columns every table made
from the files keeps, gives it. Spark writes each file sorted to a scratch folder;
the driver then streams those files through pyarrow into the same layout the DuckDB
build writes, in bounded memory.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from twotower.data.build.dialect import Dialect
from twotower.data.build.job import BuildJob, BuildOptions, Built, Scan
from twotower.data.build.parquet import Files, checked_parquet_files, write_stream
from twotower.data.build.plan import run_plan
from twotower.data.config import TableSpec
from twotower.errors import ConfigError, DataError

# each row's source order: the source's number, its file, its place in the file
_ORDER = ("_source", "_file", "_row")


class SparkEngine:
    """Builds on Spark, through the driver in this process.

    Args:
        master: the Spark master (``local[2]``: two threads here;
            ``spark://host:7077``: a cluster). An active session is reused as it is.
    """

    name = "spark"

    def __init__(self, master: str = "local[2]") -> None:
        self.master = master

    def build(self, job: BuildJob, staging: Path) -> Built:
        """Runs the plan on a Spark session, its scratch files in ``staging``.

        Raises:
            ConfigError: PySpark is not installed.
            DataError: as the plan.
        """
        try:
            from pyspark.sql import SparkSession
        except ImportError:
            raise ConfigError(
                "--engine spark needs PySpark (pip install 'twotower[spark]') and Java 17 or later"
            ) from None
        scratch = staging / "spark"
        created = SparkSession.getActiveSession() is None
        builder = (
            SparkSession.builder.master(self.master)
            .appName("twotower data build")
            .config("spark.ui.enabled", "false")
            .config("spark.local.dir", str(scratch / "local"))
        )
        spark = builder.getOrCreate()
        # each file read whole by one task, in order; times in UTC
        spark.conf.set("spark.sql.files.maxPartitionBytes", str(1 << 50))
        spark.conf.set("spark.sql.files.openCostInBytes", str(1 << 50))
        spark.conf.set("spark.sql.session.timeZone", "UTC")
        if job.options.threads:
            spark.conf.set("spark.sql.shuffle.partitions", str(job.options.threads * 2))
        if created:
            spark.sparkContext.setLogLevel("ERROR")
        try:
            return run_plan(SparkDatabase(spark, scratch, staging, job.options), job, staging)
        finally:
            spark.catalog.clearCache()
            if created:
                spark.stop()
            shutil.rmtree(scratch, ignore_errors=True)


class SparkDialect(Dialect):
    """Spark SQL's spelling of the plan's expressions (its column of ``SPELLINGS``)."""

    name, quote_char = "spark", "`"

    def latest(self, item: str, keys: list[str], where: str | None) -> str:
        # no ordered aggregate: sort (keys..., item) structs, largest first
        fields = [f"'k{number}', {key}" for number, key in enumerate(keys)]
        row = f"named_struct({', '.join(fields)}, 'item', {item})"
        if where:
            row = f"CASE WHEN {where} THEN {row} END"
        return f"transform(sort_array(collect_list({row}), false), s -> s.item)"

    def sorted_pair(self, value: str, table: str, k: int) -> str:
        ranked = (
            f"SELECT v, row_number() OVER (ORDER BY v) - 1 AS k "
            f"FROM (SELECT {value} AS v FROM {table}) t"
        )
        return f"SELECT v FROM ({ranked}) r WHERE k BETWEEN {k} AND {k + 1} ORDER BY k"


class SparkDatabase:
    """The plan's tables as cached temporary views of a Spark session (``Database``)."""

    dialect = SparkDialect()
    helpers = _ORDER

    def __init__(self, spark: Any, scratch: Path, staging: Path, options: BuildOptions) -> None:
        self.spark, self.scratch, self.staging, self.options = spark, scratch, staging, options
        self.frames: dict[str, Any] = {}  # the cached frame behind each table
        self.scans = 0

    def scan(self, table: TableSpec, number: int) -> Scan:
        from pyspark.sql import functions as F

        frame = _read(self.spark, table)
        columns = list(frame.columns)
        frame = frame.withColumn("_file", F.input_file_name())
        frame = frame.withColumn("_row", F.monotonically_increasing_id())
        name = f"scan_{self.scans}"
        self.scans += 1
        frame.createOrReplaceTempView(name)
        return Scan(name, columns, [f"{number} AS _source", "_file", "_row"])

    def parquet(self, name: str, path: Path) -> None:
        self.spark.read.parquet(str(path)).createOrReplaceTempView(name)

    def create(self, name: str, query: str) -> None:
        self._keep(name, self.spark.sql(query))

    def _keep(self, name: str, frame: Any) -> None:
        """``frame`` cached and computed as table ``name``; the frame it replaces,
        which it may read, uncached after."""
        frame = frame.cache()
        frame.count()
        replaced = self.frames.pop(name, None)
        if replaced is not None:
            replaced.unpersist()
        self.frames[name] = frame
        frame.createOrReplaceTempView(name)

    def drop(self, name: str) -> None:
        self.frames.pop(name).unpersist()
        self.spark.catalog.dropTempView(name)

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self.spark.sql(query).collect()]

    def columns(self, table: str) -> dict[str, str]:
        return dict(self.spark.table(table).dtypes)

    def source_order(self, table: str) -> str:
        return ", ".join(_ORDER) if "_row" in self.columns(table) else "key"

    def cast_column(self, table: str, column: str, kind: str, value: str | None = None) -> None:
        q = self.dialect.quote
        value = value or q(column)
        columns = [
            f"CAST({value} AS {kind}) AS {q(c)}" if c == column else q(c)
            for c in self.columns(table)
        ]
        self.create(table, f"SELECT {', '.join(columns)} FROM {table}")

    def delete(self, table: str, where: str) -> None:
        self.create(table, f"SELECT * FROM {table} WHERE NOT ({where})")

    def append_keys(self, table: str, query: str) -> None:
        """The keys' rows come after the files' (source 1), in key order."""
        self.spark.sql(query).toDF("key").createOrReplaceTempView("appended_keys")
        rows = {
            "_source": "1",
            "_file": "''",
            "_row": "CAST(row_number() OVER (ORDER BY key) AS BIGINT)",
            "key": "key",
        }
        q = self.dialect.quote
        select = ", ".join(
            f"{rows.get(c, f'CAST(NULL AS {kind})')} AS {q(c)}"
            for c, kind in self.columns(table).items()
        )
        self.create(table, f"SELECT * FROM {table} UNION ALL SELECT {select} FROM appended_keys")

    def first_row(self, table: str, column: str, where: str) -> tuple[Any, int] | None:
        from pyspark.sql import functions as F

        order = ", ".join(_ORDER)
        first = self.spark.sql(
            f"SELECT {column} AS value, {order} FROM {table} WHERE {where} ORDER BY {order} LIMIT 1"
        ).first()
        if first is None:
            return None
        kinds = self.columns(table)
        place = F.struct(*[F.lit(first[c]).cast(kinds[c]).alias(c) for c in _ORDER])
        before = self.spark.table(table).where(F.struct(*_ORDER) < place).count()
        return first["value"], before

    def write(self, query: str, order: str, name: str, per_file: int | None) -> Files:
        """Spark writes the rows sorted into a scratch folder; the driver streams its
        files into ``staging`` in the build's layout."""
        folder = self.scratch / name
        self.spark.sql(f"{query} ORDER BY {order}").write.mode("overwrite").parquet(str(folder))
        parts = sorted(folder.glob("part-*.parquet"))
        if not parts:
            return {}
        group = self.options.row_group_rows
        batches = (
            batch for part in parts for batch in pq.ParquetFile(part).iter_batches(batch_size=group)
        )
        reader = pa.RecordBatchReader.from_batches(pq.read_schema(parts[0]), batches)
        return write_stream(reader, self.staging, name, per_file, group)


def _read(spark: Any, table: TableSpec) -> Any:
    """A DataFrame of ``table``.

    Raises:
        DataError: the file is missing or unreadable (named).
    """
    path = Path(table.path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        if table.is_parquet:
            frame = spark.read.parquet(*[str(f) for f in checked_parquet_files(path)])
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
    return frame
