"""Ragged lists (a flat array of values plus each row's length) to padded matrices."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def list_parts(lists: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """The flat values and per-row lengths of an Arrow list array (null rows: length 0)."""
    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy().astype(np.int64)
    return pc.list_flatten(lists), lengths


def pad(
    values: np.ndarray,
    lengths: np.ndarray,
    max_len: int,
    width: int | None = None,
    dtype: type = np.int64,
) -> np.ndarray:
    """Packs each row's values into a (rows, L) matrix padded with 0.

    Args:
        values: (sum(lengths),) the rows' values, row after row.
        lengths: (rows,) how many values each row has.
        max_len: a row keeps at most its first ``max_len`` values.
        width: L; default the longest kept row (at least 1).
        dtype: the matrix's type.

    Returns:
        (rows, L) of ``dtype``.
    """
    kept = np.minimum(lengths, max_len)
    if width is None:
        width = max(int(kept.max(initial=0)), 1)
    starts = np.cumsum(lengths) - lengths  # (rows,), also for zero rows
    row = np.repeat(np.arange(len(lengths)), kept)
    position = np.arange(len(row)) - np.repeat(np.cumsum(kept) - kept, kept)
    out = np.zeros((len(lengths), width), dtype)
    out[row, position] = values[np.repeat(starts, kept) + position]
    return out


def spans(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The flat positions ``starts[r] .. starts[r] + lengths[r]`` of every row r, row
    after row: what gathers rows of a ragged array (``values[spans(...)]``)."""
    lengths = np.asarray(lengths, np.int64)
    before = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, np.int64) - before, lengths) + np.arange(lengths.sum())
