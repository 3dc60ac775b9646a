"""Vectors computed elsewhere (text or image embeddings): ``dim`` numbers per row.

A ``vector`` feature reads a list column (any Arrow list type, or a fixed_size_list)
of numbers. Every row is checked, all rows at once (the lists flattened into one
numpy array, never one row at a time in Python):

    width       a row of another length than ``dim``        refused
    values      a null, NaN or infinite number in a row     refused
    missing     a null row                                  refused, or zeros with
                                                            ``missing: zero``

A refused row is a ``DataError`` naming the feature, its column and the row. Then
the rows are normalized (``l2``: each over its Euclidean norm; ``standardize``: each
dimension less its training mean, over its training standard deviation; ``none``) and
a missing row is all zeros. Only ``standardize`` fits anything: the per-dimension
mean and standard deviation, saved as two arrays of the feature state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twotower.errors import DataError
from twotower.features.specs import VectorFeature
from twotower.features.transform import FitContext, Transform

# what read_vectors finds of each row
VALID, MISSING_ROW, WRONG_WIDTH, NOT_FINITE = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class VectorRows:
    """A list column's rows read into numpy, each row checked.

    Attributes:
        matrix: (B, dim) float64 each valid row's numbers; zeros in the others.
        status: (B,) int8 ``VALID``, ``MISSING_ROW`` (null), ``WRONG_WIDTH`` or
            ``NOT_FINITE`` (a null, NaN or infinite number in the row).
        lengths: (B,) how many numbers each row holds (0 for a missing one).
    """

    matrix: np.ndarray
    status: np.ndarray
    lengths: np.ndarray


def read_vectors(values: pa.Array | pa.ChunkedArray, dim: int) -> VectorRows:
    """The rows of a list column (of numbers; or a column of nulls only), ``dim`` wide.

    Raises:
        DataError: the column does not hold lists of numbers.
    """
    array = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    B = len(array)
    if pa.types.is_null(array.type):
        return VectorRows(np.zeros((B, dim)), np.full(B, MISSING_ROW, np.int8), np.zeros(B, int))
    if not _numeric_lists(array.type):
        raise DataError(f"holds {array.type}, not lists of numbers")
    null = array.is_null().to_numpy(zero_copy_only=False)
    lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy().astype(np.int64)
    flat = pc.cast(pc.list_flatten(array), pa.float64()).to_numpy(zero_copy_only=False)
    owner = np.repeat(np.arange(B), lengths)  # (values,) the row of each number
    not_finite = np.bincount(owner[~np.isfinite(flat)], minlength=B) > 0
    wrong = ~null & (lengths != dim)
    status = np.select(
        [wrong, not_finite, null], [WRONG_WIDTH, NOT_FINITE, MISSING_ROW], VALID
    ).astype(np.int8)
    matrix = np.zeros((B, dim))
    valid = status == VALID
    matrix[valid] = flat[valid[owner]].reshape(-1, dim)
    return VectorRows(matrix, status, lengths)


def _numeric_lists(kind: pa.DataType) -> bool:
    """Whether ``kind`` is a list type (variable, large or fixed-size) of numbers."""
    lists = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if not (lists or pa.types.is_fixed_size_list(kind)):
        return False
    item = kind.value_type
    return pa.types.is_integer(item) or pa.types.is_floating(item) or pa.types.is_null(item)


class VectorTransform(Transform):
    """A list column of ``dim`` numbers -> (rows, dim) float32, checked and normalized."""

    spec: VectorFeature

    def __init__(self, spec: VectorFeature) -> None:
        super().__init__(spec)
        self.mean = np.zeros(spec.dim)
        self.std = np.ones(spec.dim)

    def fit(self, values: pa.Array, context: FitContext) -> None:
        observed = self.observed(values, context.rows)
        if self.spec.normalize == "standardize" and len(observed):
            self.fit_moments(len(observed), observed.mean(axis=0), observed.std(axis=0))

    def observed(self, values: pa.Array, rows: np.ndarray | None = None) -> np.ndarray:
        """(n, dim) float64 the rows that are not missing, as the statistics see them.

        Args:
            values: the rows.
            rows: (B,) each row's number in the table it comes from, for the error.

        Raises:
            DataError: a row is refused (``missing: error`` refuses a missing one too).
        """
        read = self._checked(values, rows)
        return read.matrix[read.status == VALID]

    def fit_moments(self, count: int, mean: np.ndarray, std: np.ndarray) -> None:
        """Fits standardization from the rows' count and per-dimension mean and std (a
        dimension that never varies keeps std 1)."""
        if count:
            self.mean = np.asarray(mean, np.float64)
            self.std = np.where(np.asarray(std) > 0, std, 1.0).astype(np.float64)

    def transform(self, values: pa.Array) -> np.ndarray:
        """(B, dim) float32 the normalized rows; zeros for a missing row (``missing:
        zero``). Raises ``DataError`` naming the first refused row."""
        read = self._checked(values, None)
        matrix = read.matrix
        if self.spec.normalize == "l2":
            norms = np.linalg.norm(matrix, axis=1, keepdims=True)  # (B, 1)
            matrix = np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
        elif self.spec.normalize == "standardize":
            matrix = (matrix - self.mean) / self.std
        matrix[read.status != VALID] = 0.0
        return matrix.astype(np.float32)

    def row_errors(self, values: pa.Array) -> dict[int, str]:
        """Each row ``transform`` would refuse, with why, by position (a request's rows
        are refused one by one, never the batch)."""
        read = self._read(values)
        return {int(row): self._problem(read, int(row), None) for row in self._refused(read)}

    def _checked(self, values: pa.Array, rows: np.ndarray | None) -> VectorRows:
        """The rows read; ``DataError`` naming the first refused one (as ``rows`` number it)."""
        read = self._read(values)
        refused = self._refused(read)
        if len(refused):
            first = int(refused[0])
            raise DataError(self._problem(read, first, first if rows is None else int(rows[first])))
        return read

    def _read(self, values: pa.Array) -> VectorRows:
        try:
            return read_vectors(values, self.spec.dim)
        except DataError as err:
            raise DataError(f"{self._where()}: {err}") from None

    def _refused(self, read: VectorRows) -> np.ndarray:
        """(R,) the positions of the rows refused, in order."""
        refused = (read.status == WRONG_WIDTH) | (read.status == NOT_FINITE)
        if self.spec.missing == "error":
            refused |= read.status == MISSING_ROW
        return np.flatnonzero(refused)

    def _problem(self, read: VectorRows, position: int, row: int | None) -> str:
        """What is wrong with the row at ``position``, named ``row`` in the error (None:
        the caller names the row)."""
        status = int(read.status[position])
        if status == WRONG_WIDTH:
            problem = f"holds {read.lengths[position]} numbers, not dim {self.spec.dim}"
        elif status == NOT_FINITE:
            problem = "holds a null, NaN or infinite number"
        else:
            problem = "is missing (null); missing: zero reads a missing vector as zeros"
        which = "the vector" if row is None else f"row {row} (0-based)"
        return f"{self._where()}: {which} {problem}"

    def _where(self) -> str:
        return f"vector feature {self.spec.name!r} (column {self.spec.column!r})"

    @property
    def size(self) -> int:
        return self.spec.dim

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self.spec.normalize != "standardize":
            return {}, {}
        return {}, {"mean": self.mean, "std": self.std}

    def load_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        if self.spec.normalize == "standardize":
            self.mean, self.std = arrays["mean"], arrays["std"]
