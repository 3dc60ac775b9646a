"""EASE, the closed-form linear item-item autoencoder (Steck, WWW 2019).

    P = (X^T X + l2 I)^-1,   B = I - P / diag(P) (column j divided by P_jj),   diag(B) = 0

and a query's scores are ``x_q @ B``. B is dense N x N: fine up to some 20k items.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


class EASE:
    """Scores items with the EASE weight matrix fitted on the train matrix.

    Args:
        l2: the L2 penalty lambda on B; larger values shrink the weights.
    """

    def __init__(self, l2: float = 500.0) -> None:
        if l2 <= 0:
            raise ValueError(f"l2 must be > 0 so that X^T X + l2 I is invertible, got {l2}")
        self.l2 = l2
        self.weights: np.ndarray | None = None  # (N, N) float32 B
        self._train: sp.csr_matrix | None = None

    def fit(self, train: sp.csr_matrix) -> EASE:
        """Solves for B in closed form.

        Args:
            train: (num_queries, N) binary query x item matrix.

        Returns:
            self, fitted.
        """
        train = sp.csr_matrix(train, dtype=np.float64)
        self.fit_gram(train.T @ train)
        self._train = sp.csr_matrix(train, dtype=np.float32)
        return self

    def fit_gram(self, gram: sp.spmatrix) -> EASE:
        """Solves for B from the (N, N) co-occurrence counts X^T X alone (they may be
        summed over chunks of queries); ``score_rows`` then scores query rows."""
        gram = torch.from_numpy(sp.csr_matrix(gram, dtype=np.float64).toarray())  # (N, N)
        gram.diagonal().add_(self.l2)
        # The Gram matrix plus l2 I is symmetric positive definite: Cholesky inverts it.
        precision = torch.cholesky_inverse(torch.linalg.cholesky(gram))  # (N, N) P
        weights = -precision / precision.diagonal()[None, :]
        weights.diagonal().zero_()
        self.weights = weights.to(torch.float32).numpy()
        return self

    def score(self, query_idx: np.ndarray) -> torch.Tensor:
        """Scores every item for each query.

        Args:
            query_idx: (B,) int64 query indices (rows of the train matrix).

        Returns:
            (B, N) float32 ``x_q @ B``.
        """
        if self._train is None:
            raise RuntimeError("EASE.score called before fit")
        return self.score_rows(self._train[np.asarray(query_idx, dtype=np.int64)])

    def score_rows(self, rows: sp.csr_matrix) -> torch.Tensor:
        """(B, N) float32 ``x_q @ B`` of (B, N) binary query rows."""
        if self.weights is None:
            raise RuntimeError("EASE scored before fit")
        rows = sp.csr_matrix(rows, dtype=np.float32)
        # A sparse-dense product sums each query's row on its own: batch-size independent.
        return torch.from_numpy(np.asarray(rows @ self.weights, dtype=np.float32))
