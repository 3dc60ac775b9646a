"""Interactions as a sparse binary query x item matrix.

The matrix is the shared currency of evaluation (held-out and seen items) and of the
non-neural baselines (the training matrix they are fitted on).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from twotower.data.dataset import ITEM_IDX, QUERY_IDX
from twotower.data.splits import Split, check_held_out
from twotower.errors import DataError


def interaction_matrix(table: pa.Table, num_queries: int, num_items: int) -> sp.csr_matrix:
    """Builds the binary matrix of which query interacted with which item.

    Args:
        table: interactions with int64 columns ``query_idx`` and ``item_idx`` (dense
            row positions of the query and item tables).
        num_queries: number of rows of the matrix.
        num_items: number of columns of the matrix.

    Returns:
        A (num_queries, num_items) float32 CSR matrix, 1.0 where the query has at least
        one interaction with the item (a repeated interaction counts once), with
        sorted indices and no explicit zeros.

    Raises:
        DataError: a column is missing or an index lies outside the matrix.
    """
    rows = _index_column(table, QUERY_IDX, num_queries)
    cols = _index_column(table, ITEM_IDX, num_items)
    ones = np.ones(len(rows), dtype=np.float32)
    matrix = sp.csr_matrix((ones, (rows, cols)), shape=(num_queries, num_items))
    # The COO -> CSR conversion sums duplicates; a repeat is still one interaction.
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    matrix.sort_indices()
    return matrix


def _index_column(table: pa.Table, name: str, size: int) -> np.ndarray:
    if name not in table.column_names:
        raise DataError(f"the interactions lack column {name!r}; they have {table.column_names}")
    column = table.column(name)
    if column.null_count:
        raise DataError(f"{column.null_count} interaction(s) have an empty {name}")
    values = np.asarray(column.to_numpy(), dtype=np.int64)
    if len(values) and (values.min() < 0 or values.max() >= size):
        bad = values[(values < 0) | (values >= size)][0]
        raise DataError(f"{name} {bad} is outside [0, {size})")
    return values


def known_before(split: Split, part: str, num_queries: int, num_items: int) -> sp.csr_matrix:
    """(num_queries, N) binary matrix of the interactions known before ``part``.

    Train for ``valid``; train + validation for ``test``.
    """
    check_held_out(part)
    known = interaction_matrix(split.train, num_queries, num_items)
    if part == "test":
        known = (known + interaction_matrix(split.valid, num_queries, num_items)).tocsr()
        known.data[:] = 1.0  # an item in both train and valid is known once
    return known
