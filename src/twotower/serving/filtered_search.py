"""The index search with a mask of allowed items, and the exact search that answers
narrow masks on an approximate index.

The index applies the mask inside its search (``Index.search``'s ``allowed``). An
approximate index walks (HNSW) or probes (IVF) past the items a narrow mask leaves out
and may find fewer than k of those it keeps, or miss the best of them; vector
databases answer such a filter by brute force over the items it keeps, and so does
this: a mask that keeps at most ``exact_limit`` items is searched by an ``ExactIndex``
over the item vectors themselves (no copy), which scores only the kept ones. The
limit's default (``settings.EXACT_FILTER_LIMIT``) is measured in docs/benchmarks.md.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.sparse as sp

from twotower.index import ExactIndex, Index


class FilteredSearch:
    """An index's search with an ``allowed`` mask over item rows: narrow masks on an
    approximate index are searched exactly over the kept items.

    Args:
        index: the item index (over the item rows).
        vectors: (N, D) the item vectors it was built on (a mapped file stays mapped).
        exact_limit: a mask that keeps at most this many items is searched exactly
            when ``index`` is approximate (0: never).
    """

    def __init__(self, index: Index, vectors: np.ndarray, exact_limit: int) -> None:
        self.index = index
        self.vectors = vectors
        self.exact_limit = exact_limit

    @functools.cached_property
    def exact(self) -> ExactIndex:
        """The exact index over the item vectors themselves, made on first use."""
        return ExactIndex.over(self.vectors)

    def index_for(self, allowed: np.ndarray | None) -> Index:
        """The index that searches with ``allowed``: the exact one for a narrow mask on
        an approximate index, else the index itself."""
        if allowed is None or self.index.is_exact:
            return self.index
        return self.exact if np.count_nonzero(allowed) <= self.exact_limit else self.index

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: sp.csr_matrix | None = None,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(B, k) ids and scores of ``Index.search`` for (B, D) queries, and no
        interests; for (B, K, D) queries ``Index.search_interests``'s three arrays."""
        index = self.index_for(allowed)
        if queries.ndim == 3:
            return index.search_interests(queries, k, exclude, allowed)
        ids, scores = index.search(queries, k, exclude, allowed)
        return ids, scores, None
