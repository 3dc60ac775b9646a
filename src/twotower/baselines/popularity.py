"""The popularity baseline: every query gets the items most interacted with in train."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


class Popularity:
    """Scores each item by its number of train interactions, the same for every query.

    Attributes:
        counts: (N,) float32 the number of train queries that interacted with each item;
            set by ``fit``.
    """

    def __init__(self) -> None:
        self.counts: np.ndarray | None = None

    def fit(self, train: sp.csr_matrix) -> Popularity:
        """Counts the interactions of each item.

        Args:
            train: (num_queries, N) binary query x item matrix.

        Returns:
            self, fitted.
        """
        self.counts = np.asarray(train.sum(axis=0), dtype=np.float32).ravel()
        return self

    def score(self, query_idx: np.ndarray) -> torch.Tensor:
        """Scores every item for each query.

        Args:
            query_idx: (B,) int64 query indices (only their number matters).

        Returns:
            (B, N) float32, each row the item counts.
        """
        if self.counts is None:
            raise RuntimeError("Popularity.score called before fit")
        rows = len(np.asarray(query_idx))
        return torch.from_numpy(np.tile(self.counts, (rows, 1)))
