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

    def fit_gram(self, gram: sp.spmatrix) -> Popularity:
        """The counts from the (N, N) co-occurrence counts X^T X of a binary X: item
        i's count is its diagonal entry."""
        self.counts = np.asarray(sp.csr_matrix(gram).diagonal(), dtype=np.float32)
        return self

    def score(self, query_idx: np.ndarray) -> torch.Tensor:
        """Scores every item for each query.

        Args:
            query_idx: (B,) int64 query indices (only their number matters).

        Returns:
            (B, N) float32, each row the item counts.
        """
        return self.score_rows(sp.csr_matrix((len(np.asarray(query_idx)), 0)))

    def score_rows(self, rows: sp.csr_matrix) -> torch.Tensor:
        """(B, N) float32, each row the item counts (only the number of rows matters)."""
        if self.counts is None:
            raise RuntimeError("Popularity.score called before fit")
        return torch.from_numpy(np.tile(self.counts, (rows.shape[0], 1)))
