"""Interactions streamed from a folder of Parquet files, never loaded whole.

The unit of reading is a row group. An epoch's order is a seeded permutation of the
row groups (the same in every process), read as one long sequence of rows; each
rank takes a contiguous share of it and each DataLoader worker a contiguous share of
its rank's, cut at row precision from the files' metadata alone. So across ranks and
workers every row of the folder is read exactly once per epoch, and shares differ by
at most one row. Within a share, rows go through a bounded shuffle buffer: row groups
are read in turn until the buffer holds ``buffer_rows`` rows, the buffer is shuffled,
and its first half leaves as batches while the second half stays to mix with what is
read next.

Memory: one row group being read plus the buffer (``buffer_rows`` rows of the read
columns), whatever the size of the folder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from twotower.errors import DataError


@dataclasses.dataclass(frozen=True)
class RowGroup:
    """One row group of one file, and where it starts in the folder's row numbering."""

    path: Path
    index: int
    rows: int


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows ``start:stop`` (within the row group) of one row group."""

    group: RowGroup
    start: int
    stop: int


# (rows of a piece, the piece) -> the rows to use (checked, with columns added)
Prepare = Callable[[pa.Table, Piece], pa.Table]


def parquet_files(path: Path) -> list[Path]:
    """A Parquet file, or every ``*.parquet`` file under a folder (sorted, recursively).

    Raises:
        DataError: nothing to read there.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        raise DataError(f"{path}: the folder holds no .parquet files")
    return files


class ParquetStream:
    """The row groups of a set of Parquet files, read in shares, in bounded memory.

    Args:
        path: a Parquet file or a folder of them; every file must have ``columns``.
        columns: the columns to read.
    """

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.files = parquet_files(path)
        self.columns = list(columns)
        self.groups: list[RowGroup] = []
        schema = None
        for file in self.files:
            try:
                meta = pq.ParquetFile(file)
            except (pa.ArrowInvalid, OSError) as err:
                raise DataError(f"{file}: not a readable Parquet file ({err})") from None
            names = meta.schema_arrow.names
            missing = [c for c in self.columns if c not in names]
            if missing:
                raise DataError(
                    f"{file}: lacks column(s) {', '.join(map(repr, missing))}; "
                    f"it has {', '.join(map(repr, names))}"
                )
            types = {c: meta.schema_arrow.field(c).type for c in self.columns}
            if schema is not None and types != schema:
                changed = [c for c in self.columns if types[c] != schema[c]]
                raise DataError(
                    f"{file}: column(s) {', '.join(map(repr, changed))} have types "
                    f"{[str(types[c]) for c in changed]}, unlike {self.files[0].name} "
                    f"({[str(schema[c]) for c in changed]})"
                )
            schema = types
            for i in range(meta.num_row_groups):
                rows = meta.metadata.row_group(i).num_rows
                if rows:
                    self.groups.append(RowGroup(file, i, rows))
        self.num_rows = sum(g.rows for g in self.groups)

    def order(self, seed: int | None) -> list[RowGroup]:
        """The row groups in an epoch's order: a seeded permutation, or as stored."""
        if seed is None:
            return list(self.groups)
        permutation = np.random.default_rng(seed).permutation(len(self.groups))
        return [self.groups[i] for i in permutation]

    def share(self, seed: int | None, part: int, parts: int) -> list[Piece]:
        """Share ``part`` of ``parts`` of the epoch's row sequence, as row-group pieces."""
        groups = self.order(seed)
        bounds = shard_bounds(self.num_rows, parts)
        first, last = bounds[part], bounds[part + 1]
        pieces, offset = [], 0
        for group in groups:
            start, stop = max(first - offset, 0), min(last - offset, group.rows)
            if start < stop:
                pieces.append(Piece(group, start, stop))
            offset += group.rows
            if offset >= last:
                break
        return pieces

    def share_rows(self, parts: int) -> list[int]:
        """How many rows each of ``parts`` shares holds (the same for every seed)."""
        bounds = shard_bounds(self.num_rows, parts)
        return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]

    def read(self, pieces: list[Piece], prepare: Prepare | None = None) -> Iterator[pa.Table]:
        """Each piece's rows, in order, one row group at a time.

        Args:
            pieces: what to read.
            prepare: applied to each piece's rows as read (it may name the file).
        """
        handles: dict[Path, pq.ParquetFile] = {}
        for piece in pieces:
            group = piece.group
            handle = handles.get(group.path)
            if handle is None:
                handle = handles[group.path] = pq.ParquetFile(group.path)
            try:
                table = handle.read_row_group(group.index, columns=self.columns)
            except (pa.ArrowInvalid, OSError) as err:
                raise DataError(
                    f"{group.path}: row group {group.index} cannot be read ({err})"
                ) from None
            table = table.slice(piece.start, piece.stop - piece.start)
            yield table if prepare is None else prepare(table, piece)

    def batches(
        self,
        pieces: list[Piece],
        batch_rows: int,
        buffer_rows: int,
        rng: np.random.Generator | None,
        prepare: Prepare | None = None,
    ) -> Iterator[pa.Table]:
        """The pieces' rows in batches of ``batch_rows`` (the last may be smaller).

        Args:
            pieces: what to read (``share``).
            batch_rows: rows per batch.
            buffer_rows: the shuffle buffer's size; rows leave it in random order.
            rng: the shuffle's generator; None keeps the stored order.
            prepare: applied to each piece's rows as read, before the buffer.
        """
        held: list[pa.Table] = []
        count = 0
        for table in self.read(pieces, prepare):
            held.append(table)
            count += table.num_rows
            if count < max(buffer_rows, batch_rows):
                continue
            buffer = _shuffled(pa.concat_tables(held), rng)
            # the first half (whole batches) leaves; the rest mixes with later reads
            leaving = max(batch_rows, (count // 2) // batch_rows * batch_rows)
            yield from _cut(buffer.slice(0, leaving), batch_rows)
            held, count = [buffer.slice(leaving)], count - leaving
        if count:
            yield from _cut(_shuffled(pa.concat_tables(held), rng), batch_rows)


def _shuffled(table: pa.Table, rng: np.random.Generator | None) -> pa.Table:
    table = table.combine_chunks()
    return table if rng is None else table.take(pa.array(rng.permutation(table.num_rows)))


def _cut(table: pa.Table, batch_rows: int) -> Iterator[pa.Table]:
    for start in range(0, table.num_rows, batch_rows):
        yield table.slice(start, batch_rows)


def shard_bounds(count: int, parts: int) -> list[int]:
    """Boundaries splitting ``count`` rows into ``parts`` contiguous shards whose sizes
    differ by at most one (the first ``count % parts`` shards hold the extra row).

    Returns:
        ``parts + 1`` offsets, 0 first and ``count`` last.
    """
    base, extra = divmod(count, parts)
    return [i * base + min(i, extra) for i in range(parts + 1)]


def read_item_table(path: Path, columns: list[str]) -> pa.Table:
    """A streamed dataset's item table (the corpus, held in memory): these columns.

    Raises:
        DataError: nothing to read at ``path``, a column missing, or no rows.
    """
    parquet_files(path)  # a clear error if there is nothing to read
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError, KeyError) as err:
        raise DataError(f"{path}: cannot read the item columns {columns} ({err})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: the item table has no rows")
    return table
