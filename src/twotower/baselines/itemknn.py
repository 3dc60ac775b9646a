"""The item-based nearest-neighbour baseline (ItemKNN) with cosine similarity.

sim(i, j) = |U_i and U_j| / (sqrt(|U_i|) sqrt(|U_j|) + shrink), U_i the train queries of
item i; sim(i, i) = 0, so an item never recommends itself. Each item keeps only its
``neighbors`` most similar items (ties toward the lower index), and a query's score for
item j is sum over its train items i of sim(i, j): ``score = x_q @ S``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


class ItemKNN:
    """Scores items by their cosine similarity to the query's train items.

    Args:
        neighbors: how many most similar items each item keeps; None keeps all.
        shrink: added to the cosine denominator; damps similarities resting on few
            common queries.
        block_size: items whose similarities are computed at once; bounds fit memory
            to ``block_size x N`` dense values.
    """

    def __init__(
        self, neighbors: int | None = 100, shrink: float = 0.0, block_size: int = 1024
    ) -> None:
        if neighbors is not None and neighbors < 1:
            raise ValueError(f"neighbors must be >= 1 or None, got {neighbors}")
        if shrink < 0 or block_size < 1:
            raise ValueError(f"need shrink >= 0 and block_size >= 1: {shrink}, {block_size}")
        self.neighbors = neighbors
        self.shrink = shrink
        self.block_size = block_size
        self.similarity: sp.csr_matrix | None = None  # (N, N) float32, row i: i's neighbours
        self._train: sp.csr_matrix | None = None
        self.num_items: int | None = None

    def fit(self, train: sp.csr_matrix) -> ItemKNN:
        """Computes the pruned item-item cosine similarity.

        Args:
            train: (num_queries, N) binary query x item matrix.

        Returns:
            self, fitted.
        """
        train = sp.csr_matrix(train, dtype=np.float64)
        self.fit_gram(train.T @ train)
        self._train = sp.csr_matrix(train, dtype=np.float32)
        return self

    def fit_gram(self, gram: sp.spmatrix) -> ItemKNN:
        """The similarities from the (N, N) co-occurrence counts X^T X alone (they may
        be summed over chunks of queries): for a binary X, item i's norm is
        sqrt(X^T X[i, i]). ``score_rows`` then scores query rows."""
        gram = sp.csr_matrix(gram, dtype=np.float64)
        norms = np.sqrt(gram.diagonal())  # (N,)
        num_items = gram.shape[1]
        blocks = []
        for start in range(0, num_items, self.block_size):
            block = np.arange(start, min(start + self.block_size, num_items))
            common = gram[block].toarray()  # (b, N) co-occurrences
            denominator = np.outer(norms[block], norms) + self.shrink
            sim = np.divide(common, denominator, out=np.zeros_like(common), where=denominator > 0)
            sim[np.arange(len(block)), block] = 0.0
            blocks.append(sp.csr_matrix(np.where(self._keep(sim), sim, 0.0), dtype=np.float32))
        self.similarity = sp.vstack(blocks, format="csr") if blocks else None
        self.num_items = num_items
        return self

    def _keep(self, sim: np.ndarray) -> np.ndarray:
        """(b, N) bool: each row's ``neighbors`` largest positive entries, ties to lower j."""
        positive = sim > 0
        if self.neighbors is None or self.neighbors >= sim.shape[1]:
            return positive
        cut = sim.shape[1] - self.neighbors
        threshold = np.partition(sim, cut, axis=1)[:, cut : cut + 1]  # (b, 1) n-th largest
        above = sim > threshold
        tied = sim == threshold
        room = self.neighbors - above.sum(axis=1, keepdims=True)
        return positive & (above | (tied & (np.cumsum(tied, axis=1) <= room)))

    def score(self, query_idx: np.ndarray) -> torch.Tensor:
        """Scores every item for each query.

        Args:
            query_idx: (B,) int64 query indices (rows of the train matrix).

        Returns:
            (B, N) float32 ``x_q @ S``.
        """
        if self._train is None:
            raise RuntimeError("ItemKNN.score called before fit")
        return self.score_rows(self._train[np.asarray(query_idx, dtype=np.int64)])

    def score_rows(self, rows: sp.csr_matrix) -> torch.Tensor:
        """(B, N) float32 ``x_q @ S`` of (B, N) binary query rows."""
        if self.num_items is None:
            raise RuntimeError("ItemKNN scored before fit")
        rows = sp.csr_matrix(rows, dtype=np.float32)
        if self.similarity is None:  # no items at all
            return torch.zeros((rows.shape[0], 0), dtype=torch.float32)
        # A sparse product sums each query's row on its own: batch-size independent.
        scores = (rows @ self.similarity).toarray()
        return torch.from_numpy(scores.astype(np.float32, copy=False))
