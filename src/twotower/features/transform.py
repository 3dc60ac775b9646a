"""The shape every fitted feature transform shares, and what fitting may look at."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa

MISSING = 0
OOV = 1
RESERVED = 2  # indices below this are MISSING and OOV


@dataclasses.dataclass(frozen=True)
class FitContext:
    """What a transform may learn from, besides its own column (training data only).

    Attributes:
        weights: (rows,) how many times each row of the column counts; for a side's
            key column, the number of training interactions of that id.
        train: the training interactions (``query_idx``, ``item_idx``, maybe ``timestamp``).
        query_keys: the query key of each query index.
        item_codes: by item index, the item's index in the shared item-id vocabulary.
        rows: (rows,) each value's row in the side's table, for an error that names a
            row (None: the values' own positions).
    """

    weights: np.ndarray | None = None
    train: pa.Table | None = None
    query_keys: pa.Array | None = None
    item_codes: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    rows: np.ndarray | None = None


class Transform(abc.ABC):
    """Raw column -> numpy array, fitted on training data, saved as JSON + numpy arrays."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec

    @abc.abstractmethod
    def fit(self, values: pa.Array, context: FitContext) -> None:
        """Learns the state from the training rows' values."""

    @abc.abstractmethod
    def transform(self, values: pa.Array) -> np.ndarray:
        """Maps raw values (any rows, unseen or missing included) to model inputs."""

    def grow(self, fresh: Transform) -> Transform:
        """This transform, fitted on earlier data, carried onto new data.

        Args:
            fresh: the same feature fitted on the new data (its spec may differ from
                this one's only in what applies to new values: ``min_count``,
                ``max_size``).

        Returns:
            A transform under ``fresh``'s spec. By default this one's state, kept as it
            is: a statistic refitted on new data would shift every input the model
            learned from. A vocabulary appends the new values instead.
        """
        kept = type(fresh)(fresh.spec)
        kept.load_state(*self.state())
        return kept

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Embedding rows (index outputs) or vector width (float outputs)."""

    @abc.abstractmethod
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The fitted state: JSON-ready scalars and numpy arrays (no objects)."""

    @abc.abstractmethod
    def load_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Restores what ``state`` returned."""


def to_numpy_array(values: pa.Array) -> np.ndarray:
    """An Arrow array as a numpy array that saves without pickle (strings: fixed-width).

    Numbers and booleans keep their own dtype: as text, ``1.0`` or ``True`` would no
    longer match the values Arrow compares them with after loading.
    """
    kind = values.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return values.to_numpy(zero_copy_only=False)
    return np.asarray(values.to_pylist(), dtype=str)


def from_numpy_array(values: np.ndarray) -> pa.Array:
    """The inverse of ``to_numpy_array``."""
    return pa.array(values) if values.dtype.kind != "U" else pa.array(values.tolist(), pa.string())
