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


# ``auto``: exact search up to this many items, HNSW up to the next bound, then IVF-PQ.
AUTO_EXACT_UP_TO = 200_000
AUTO_HNSW_UP_TO = 5_000_000


def choose_index(kind: str, num_items: int) -> str:
    """``kind`` itself, or for ``auto`` the kind that suits a corpus of ``num_items``.

    Exact search costs a pass over every vector per batch of queries: at 64 floats a
    vector that is about a millisecond per 200,000 items on a memory bus of ~20 GB/s,
    still fine for serving. Beyond that, HNSW answers in well under a millisecond at
    high recall, and past a few million items IVF-PQ keeps the index small in memory.
    """
    if kind != "auto":
        return kind
    if num_items <= AUTO_EXACT_UP_TO:
        return "exact"
    return "hnsw" if num_items <= AUTO_HNSW_UP_TO else "ivfpq"


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
        queries: (B, D) query vectors, or (B, K, D) multi-interest queries (searched
            with ``search_interests`` by both indexes).
        k: the cutoff.
        exclude: (B, N) items excluded for each query, as in a served search.
    """
    exact = ExactIndex()
    exact.build(vectors)
    if queries.ndim == 3:
        truth = exact.search_interests(queries, k, exclude)[0]
        found = index.search_interests(queries, k, exclude)[0]
    else:
        truth, _ = exact.search(queries, k, exclude)
        found, _ = index.search(queries, k, exclude)
    relevant = truth >= 0
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=1) & relevant  # (B, k)
    return float(hits.sum() / max(relevant.sum(), 1))


def load_index(folder: Path, mapped: bool = True) -> Index:
    """The index saved in ``folder``, of whatever kind its ``index.json`` names, mapped
    from its files or (``mapped=False``) read into memory, as ``Index.load`` says."""
    kind = read_meta(folder)["kind"]
    if kind not in INDEXES:
        raise DataError(
            f"{Path(folder) / META_FILE}: unknown index kind {kind!r}; this version of "
            f"twotower reads {', '.join(INDEXES)}"
        )
    return INDEXES[kind].load(folder, mapped=mapped)


__all__ = [
    "INDEXES",
    "ExactIndex",
    "FlatIndex",
    "HNSWIndex",
    "IVFPQIndex",
    "Index",
    "build_index",
    "choose_index",
    "load_index",
    "recall_against_exact",
]
