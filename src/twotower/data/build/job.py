"""What a build is asked (``BuildJob``), what it returns (``Built``), and what its plan
needs of an engine to run on it (``Database``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

from twotower.data.build.dialect import Dialect
from twotower.data.build.format import OutputColumns, output_columns
from twotower.data.build.parquet import Files
from twotower.data.config import DataConfig, SplitConfig, TableSpec


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How a build runs and lays its files out, whichever engine runs it.

    Attributes:
        threads: the engine's threads (DuckDB's ``threads``; Spark's shuffle
            partitions are twice this); None: the engine's default.
        rows_per_part: training rows per Parquet file.
        row_group_rows: rows per Parquet row group.
    """

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


@dataclasses.dataclass(frozen=True)
class BuildJob:
    """One build's inputs, the same for every engine.

    Attributes:
        data: the ``files`` source: interactions, feature tables, ``min_weight``.
        split: how the interactions are split.
        options: threads and the files' layout.
        histories: the history columns to add.
        columns: each side's feature columns (``query``: joined into every row from
            ``data.queries``; ``item``: written with the corpus to ``items.parquet``).
    """

    data: DataConfig
    split: SplitConfig
    options: BuildOptions
    histories: Histories
    columns: dict[str, list[str]]

    @property
    def outputs(self) -> OutputColumns:
        return output_columns(self.data, self.columns)


@dataclasses.dataclass(frozen=True)
class Built:
    """What an engine's build wrote in its staging folder.

    Attributes:
        files: each file's rows and sha256, by path in the build.
        rule: the history rule applied (``Histories.resolved_rule``).
    """

    files: Files
    rule: str


@dataclasses.dataclass(frozen=True)
class Scan:
    """A table an engine reads from its files.

    Attributes:
        relation: what a FROM clause names to read it.
        columns: the table's own columns, in order.
        order: SELECT items carrying each row's place in the source (the engine's
            helper columns), to keep beside the table's columns; empty where the
            engine keeps a table's insertion order itself.
    """

    relation: str
    columns: list[str]
    order: list[str]


class Database(Protocol):
    """What the plan needs of an engine: named tables, SQL over them in the engine's
    ``dialect``, and Parquet out. A table made from scans keeps its rows' source order
    (``source_order``) through every step that rewrites it.
    """

    dialect: Dialect
    helpers: tuple[str, ...]  # the columns carrying the source order, if any

    def scan(self, table: TableSpec, number: int) -> Scan:
        """Reads ``table``, the ``number``-th source in order (its rows after those of
        lower numbers). Raises DataError naming the file when it cannot be read."""

    def parquet(self, name: str, path: Path) -> None:
        """Makes the Parquet file ``path`` readable as table ``name``."""

    def create(self, name: str, query: str) -> None:
        """(Re)creates table ``name`` as the rows of ``query`` (which may read ``name``)."""

    def drop(self, name: str) -> None:
        """Drops table ``name``."""

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        """The rows of ``query``."""

    def columns(self, table: str) -> dict[str, str]:
        """Each column of ``table`` and its type, in the engine's spelling, in order."""

    def source_order(self, table: str) -> str:
        """The ORDER BY list that gives ``table``'s rows in source order (a table made
        without a scan: in key order)."""

    def cast_column(self, table: str, column: str, kind: str, value: str | None = None) -> None:
        """Replaces ``column`` of ``table`` by ``value`` (default: the column itself)
        cast to the type ``kind``, in place."""

    def delete(self, table: str, where: str) -> None:
        """Deletes the rows of ``table`` where ``where`` holds, keeping the others' order."""

    def append_keys(self, table: str, query: str) -> None:
        """Appends to ``table`` a row per key of ``query`` (one column), other columns
        null, after its own rows and in key order."""

    def first_row(self, table: str, column: str, where: str) -> tuple[Any, int] | None:
        """The value of ``column`` in the first row of ``table`` (in source order) where
        ``where`` holds, and that row's place among the table's rows; None if none."""

    def write(self, query: str, order: str, name: str, per_file: int | None) -> Files:
        """Writes the rows of ``query`` sorted by ``order`` as the build's file(s)
        ``name`` (``write_stream``'s layout)."""
