"""The build's Parquet files: its inputs checked before an engine reads them, and its
outputs written in one layout whichever engine computed them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from twotower.errors import DataError
from twotower.storage import sha256_file

Files = dict[str, dict[str, Any]]  # a file's path in the build -> its rows and sha256


def checked_parquet_files(path: Path) -> list[Path]:
    """The Parquet files of a file or folder (not searched recursively), in name order,
    each checked readable and not empty from its footer alone.

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


def write_stream(
    reader: pa.RecordBatchReader, staging: Path, name: str, per_file: int | None, group: int
) -> Files:
    """Writes the reader's rows as ``name.parquet``, or with ``per_file`` as
    ``name/part-NNNNN.parquet`` files of that many rows; row groups of ``group`` rows.

    Returns:
        Each file written (relative to ``staging``): its rows and sha256.
    """
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
        self.done: Files = {}
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
            self.path.parent.mkdir(exist_ok=True)
            self.writer, self.rows = pq.ParquetWriter(self.path, table.schema), 0
        self.writer.write_table(table, row_group_size=self.group)
        self.rows += table.num_rows
        if self.per_file and self.rows >= self.per_file:
            self._finish()

    def close(self) -> Files:
        self._finish()
        return self.done

    def _finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
            relative = self.path.relative_to(self.staging).as_posix()
            self.done[relative] = {"rows": self.rows, "sha256": sha256_file(self.path)}
            self.writer = None
