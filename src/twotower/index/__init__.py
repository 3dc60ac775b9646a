"""Item indexes behind one interface: build on item vectors, search by inner product.

base.py   the ``Index`` interface, argument checks, ``index.json``
exact.py  ``ExactIndex``: brute force in chunks, the reference for approximate indexes
ann.py    FAISS: ``flat`` (exact inner product), ``hnsw`` and ``ivfpq`` (approximate)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from twotower.errors import ConfigError, DataError
from twotower.index.ann import FlatIndex, HNSWIndex, IVFPQIndex
from twotower.index.base import META_FILE, Index, read_meta
from twotower.index.exact import ExactIndex

INDEXES: dict[str, type[Index]] = {
    "exact": ExactIndex,
    "flat": FlatIndex,
    "hnsw": HNSWIndex,
    "ivfpq": IVFPQIndex,
}


def build_index(kind: str, vectors: np.ndarray) -> Index:
    """A new index of ``kind`` (a key of ``INDEXES``) built on (N, D) float32 vectors."""
    if kind not in INDEXES:
        raise ConfigError(f"unknown index {kind!r}; choose one of {', '.join(INDEXES)}")
    index = INDEXES[kind]()
    index.build(vectors)
    return index


def recall_against_exact(
    index: Index,
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    exclude: sp.csr_matrix | None = None,
) -> float:
    """Share of the exact top k (by ``ExactIndex`` on ``vectors``) that ``index`` returns.

    Args:
        index: the index to measure, built on ``vectors``.
        vectors: (N, D) the indexed item vectors.
        queries: (B, D) query vectors.
        k: the cutoff.
        exclude: (B, N) items excluded for each query, as in a served search.
    """
    exact = ExactIndex()
    exact.build(vectors)
    truth, _ = exact.search(queries, k, exclude)
    found, _ = index.search(queries, k, exclude)
    relevant = truth >= 0
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=1) & relevant  # (B, k)
    return float(hits.sum() / max(relevant.sum(), 1))


def load_index(folder: Path) -> Index:
    """The index saved in ``folder``, of whatever kind its ``index.json`` names."""
    kind = read_meta(folder)["kind"]
    if kind not in INDEXES:
        raise DataError(
            f"{Path(folder) / META_FILE}: unknown index kind {kind!r}; this version of "
            f"twotower reads {', '.join(INDEXES)}"
        )
    return INDEXES[kind].load(folder)


__all__ = [
    "INDEXES",
    "ExactIndex",
    "FlatIndex",
    "HNSWIndex",
    "IVFPQIndex",
    "Index",
    "build_index",
    "load_index",
    "recall_against_exact",
]
