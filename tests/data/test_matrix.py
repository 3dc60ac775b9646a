import numpy as np
import pyarrow as pa
import pytest

from twotower.data.matrix import interaction_matrix
from twotower.errors import DataError


def _table(queries: list[int], items: list[int]) -> pa.Table:
    return pa.table(
        {"query_idx": pa.array(queries, pa.int64()), "item_idx": pa.array(items, pa.int64())}
    )


def test_binary_matrix_counts_duplicates_once() -> None:
    # Query 0 saw item 2 twice and item 0 once; query 2 saw item 1.
    table = _table([0, 0, 2, 0], [2, 0, 1, 2])
    matrix = interaction_matrix(table, num_queries=3, num_items=4)
    assert matrix.shape == (3, 4)
    assert matrix.dtype == np.float32
    assert matrix.has_sorted_indices
    expected = np.zeros((3, 4), dtype=np.float32)
    expected[0, [0, 2]] = 1.0
    expected[2, 1] = 1.0
    np.testing.assert_array_equal(matrix.toarray(), expected)
    assert matrix.nnz == 3


def test_indices_sorted_within_rows() -> None:
    table = _table([1, 1, 1, 0], [5, 0, 3, 4])
    matrix = interaction_matrix(table, num_queries=2, num_items=6)
    assert list(matrix.indices[matrix.indptr[1] : matrix.indptr[2]]) == [0, 3, 5]


def test_empty_table_gives_empty_matrix() -> None:
    matrix = interaction_matrix(_table([], []), num_queries=2, num_items=3)
    assert matrix.shape == (2, 3)
    assert matrix.nnz == 0


@pytest.mark.parametrize(("queries", "items"), [([0, 3], [0, 1]), ([0, 1], [0, 7]), ([-1], [0])])
def test_out_of_range_index_is_rejected(queries: list[int], items: list[int]) -> None:
    with pytest.raises(DataError, match="outside"):
        interaction_matrix(_table(queries, items), num_queries=3, num_items=4)


def test_missing_column_is_rejected() -> None:
    with pytest.raises(DataError, match="item_idx"):
        interaction_matrix(pa.table({"query_idx": [0]}), num_queries=1, num_items=1)
