"""The build on DuckDB (``twotower data build``, the default engine): one machine, out
of core.

The interactions (Parquet or CSV, any size) go into an on-disk DuckDB database in the
build folder, which spills to disk under ``memory_limit``; the plan's steps run as SQL
over it, and each part streams out as Arrow batches into Parquet. A table keeps its
insertion order (``preserve_insertion_order``), so a table made from the files holds
their rows in source order (``rowid``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twotower.data.build.dialect import Dialect
from twotower.data.build.job import BuildJob, BuildOptions, Built, Scan
from twotower.data.build.parquet import Files, checked_parquet_files, write_stream
from twotower.data.build.plan import run_plan
from twotower.data.config import TableSpec
from twotower.errors import DataError

_ENCODINGS = {"latin-1": "latin-1", "iso-8859-1": "latin-1", "utf8": "utf-8"}


class DuckDBEngine:
    """Builds on DuckDB, in the build's staging folder.

    Args:
        memory_limit: DuckDB's ``memory_limit`` (e.g. ``"4GB"``): what it holds in
            memory before it spills to the build folder; None: DuckDB's default (80%
            of RAM).
    """

    name = "duckdb"

    def __init__(self, memory_limit: str | None = None) -> None:
        self.memory_limit = memory_limit

    def build(self, job: BuildJob, staging: Path) -> Built:
        """Runs the plan on a database in ``staging``, removed afterwards.

        Raises:
            DataError: as the plan; or DuckDB ran out of memory (in one line).
        """
        import duckdb

        con = duckdb.connect(str(staging / "build.duckdb"))
        try:
            settings = {"preserve_insertion_order": "true", "temp_directory": str(staging)}
            if self.memory_limit:
                settings["memory_limit"] = self.memory_limit
            if job.options.threads:
                settings["threads"] = str(job.options.threads)
            for name, value in settings.items():
                con.execute(f"SET {name} = '{value}'")
            return run_plan(DuckDBDatabase(con, staging, job.options), job, staging)
        except duckdb.OutOfMemoryException as err:
            limit = self.memory_limit or "its default, 80% of RAM"
            raise DataError(
                f"DuckDB ran out of memory under memory_limit {limit} "
                f"({str(err).splitlines()[0]}); raise --memory-limit, or lower --threads"
            ) from None
        finally:
            con.close()
            for leftover in ["build.duckdb", "build.duckdb.wal"]:
                (staging / leftover).unlink(missing_ok=True)


class DuckDBDialect(Dialect):
    """DuckDB's spelling of the plan's expressions (its column of ``SPELLINGS``)."""

    name, quote_char = "duckdb", '"'

    def latest(self, item: str, keys: list[str], where: str | None) -> str:
        descending = ", ".join(f"{key} DESC" for key in keys)
        rows = f" FILTER (WHERE {where})" if where else ""
        return f"list({item} ORDER BY {descending}){rows}"

    def sorted_pair(self, value: str, table: str, k: int) -> str:
        return f"SELECT {value} FROM {table} ORDER BY 1 LIMIT 2 OFFSET {k}"


class DuckDBDatabase:
    """The plan's tables in a DuckDB connection (``Database``)."""

    dialect = DuckDBDialect()
    helpers: tuple[str, ...] = ()  # a table's rowid carries its source order

    def __init__(self, con: Any, staging: Path, options: BuildOptions) -> None:
        self.con, self.staging, self.options = con, staging, options

    def scan(self, table: TableSpec, number: int) -> Scan:
        relation = _relation(table)
        try:
            described = self.con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()
        except Exception as err:  # duckdb's errors name the file; keep their first line
            raise DataError(str(err).splitlines()[0]) from None
        return Scan(relation, [row[0] for row in described], [])

    def parquet(self, name: str, path: Path) -> None:
        self.con.execute(
            f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet({_literal(str(path))})"
        )

    def create(self, name: str, query: str) -> None:
        self.con.execute(f"CREATE OR REPLACE TABLE {name} AS {query}")

    def drop(self, name: str) -> None:
        self.con.execute(f"DROP TABLE {name}")

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        return self.con.execute(query).fetchall()

    def columns(self, table: str) -> dict[str, str]:
        return {row[0]: row[1] for row in self.con.execute(f"DESCRIBE {table}").fetchall()}

    def source_order(self, table: str) -> str:
        return "rowid"

    def cast_column(self, table: str, column: str, kind: str, value: str | None = None) -> None:
        quoted = self.dialect.quote(column)
        using = f" USING {value}" if value is not None else ""
        self.con.execute(f"ALTER TABLE {table} ALTER {quoted} TYPE {kind}{using}")

    def delete(self, table: str, where: str) -> None:
        self.con.execute(f"DELETE FROM {table} WHERE {where}")

    def append_keys(self, table: str, query: str) -> None:
        self.con.execute(f"INSERT INTO {table} (key) {query} ORDER BY 1")

    def first_row(self, table: str, column: str, where: str) -> tuple[Any, int] | None:
        query = f"SELECT {column}, rowid FROM {table} WHERE {where} ORDER BY rowid LIMIT 1"
        return self.con.execute(query).fetchone()

    def write(self, query: str, order: str, name: str, per_file: int | None) -> Files:
        group = self.options.row_group_rows
        reader = self.con.sql(f"{query} ORDER BY {order}").to_arrow_reader(group)
        return write_stream(reader, self.staging, name, per_file, group)


def _relation(table: TableSpec) -> str:
    """A DuckDB table function reading ``table``, rows in source order."""
    path = Path(table.path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if table.is_parquet:
        listed = ", ".join(_literal(str(f)) for f in checked_parquet_files(path))
        return f"read_parquet([{listed}])"
    encoding = _ENCODINGS.get(table.encoding.lower(), table.encoding)
    options = [
        f"delim = {_literal(table.delimiter)}",
        f"header = {str(table.header).lower()}",
        f"encoding = {_literal(encoding)}",
        f"quote = {_literal(table.quote_char or '')}",
        f"ignore_errors = {str(table.skip_bad_rows).lower()}",
    ]
    if table.columns:
        options.append("names = [" + ", ".join(_literal(c) for c in table.columns) + "]")
    return f"read_csv({_literal(str(path))}, {', '.join(options)})"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
