"""The one interface every item index implements: build, search, save, load.

An index holds the (N, D) item vectors and answers inner-product top-k queries.
Every implementation returns the same shapes and the same padding, so the exact
index is the reference an approximate one is tested against:

    ids     (B, k) int64    item rows (positions in the built vectors), best first
    scores  (B, k) float32  their inner products with the query
    where fewer than k items remain for a query, its row ends with -1 / -inf.

A search may be given ``allowed``, an (N,) bool mask over the indexed vectors: the
items it leaves out are never returned to any query of that call; and ``exclude``, a
(B, N) CSR whose row b holds the items query b may not return (a user's seen items,
the items a request names, an item itself). The two make one selection per query,
applied inside the search, never by fetching more and dropping: the exact index gives
the items left out -inf before its top k (the mask for every query, the exclusions in
one scatter over the batch), FAISS consults a per-query ``IDSelectorBitmap`` as it
searches (``ann.py``). So neither a narrow mask nor a long list of exclusions costs
results, and a query's answer does not depend on the others of its call.

``search_interests`` answers multi-interest queries (B, K, D), K vectors per query,
on top of ``search``: the same ``ids`` and ``scores`` (each item once, at its best
score over the K vectors) plus ``interests`` (B, k) int64, the vector (0..K-1) that
gave each item that score, -1 in padding.

An index grows by appending: ``add`` puts (M, D) more vectors at positions N..N+M-1,
and every earlier position keeps its vector, so a caller that maps positions to its
own rows (``twotower.serving.catalogue``) only appends to that map. Nothing is ever
deleted from an index: what must not be returned is left out with ``allowed``. An
index mapped from its file (a FAISS index loaded with ``mapped=True``) cannot grow in
place; ``growable`` gives one that can (itself, or an in-memory copy).

An index saves itself into a folder of its own: ``index.json`` (its kind, format
version, size) and whatever files the kind needs; ``load_index`` reads the kind
back and lets that class load the rest. Nothing is pickled.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from twotower.errors import DataError
from twotower.storage import atomic_write, read_json

FORMAT_VERSION = 1
META_FILE = "index.json"


class Index(abc.ABC):
    """Inner-product top-k search over a fixed set of item vectors."""

    kind: ClassVar[str]

    @abc.abstractmethod
    def build(self, vectors: np.ndarray) -> None:
        """Indexes (N, D) float32 item vectors; row i is item i in every result."""

    @abc.abstractmethod
    def add(self, vectors: np.ndarray) -> None:
        """Appends (M, D) float32 vectors after the N indexed ones: they are positions
        N..N+M-1 in every later result, and positions 0..N-1 are unchanged.

        No search of this index may run while it adds (FAISS's ``add`` is not safe
        beside a search).

        Raises:
            ValueError: before ``build``, or vectors of another width or not finite.
            RuntimeError: the index is mapped from its file and cannot grow in place
                (``growable`` gives one that can).
        """

    def growable(self) -> Index:
        """An index with the same answers that ``add`` can grow: this one, unless it is
        mapped read-only from its file (then an in-memory copy)."""
        return self

    @abc.abstractmethod
    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: sp.csr_matrix | None = None,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k items of highest inner product with each query.

        Args:
            queries: (B, D) float32 query vectors.
            k: how many items to return per query (>= 1; more than N pads).
            exclude: (B, N) CSR; items set in row b are never returned for query b.
            allowed: (N,) bool; items where it is False are never returned (to any
                query); None: every item may be.

        Returns:
            ``(ids, scores)``: (B, k) int64 item rows, best first, and (B, k) float32
            scores; -1 / -inf where fewer than k items remain.
        """

    def search_interests(
        self,
        queries: np.ndarray,
        k: int,
        exclude: sp.csr_matrix | None = None,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The k items of highest score over each query's K interest vectors.

        An item's score is its best inner product with any of the query's K vectors.
        Each vector is searched for k items (one ``search`` over the (B*K, D) flattened
        queries); the K lists are merged, each item kept once at its best score, and
        the best k kept: score descending, equal scores to the lower item row.

        Asking each vector for k is enough for an exact index: an item in the merged
        top k is in the top k of the interest that gives it its best score, for if k
        items beat it there, each of them has a merged score at least as high (and
        the lower row on a tie), so k items would beat it in the merge too. For an
        approximate index the merge is exactly as good as its K searches. With K = 1
        this is ``search`` with every found item's interest 0 (for an approximate
        index, whose ties FAISS orders its own way, up to the order of equal scores).

        Args:
            queries: (B, K, D) float32, K >= 1 vectors per query.
            k: how many items to return per query (>= 1; more than remain pads).
            exclude: (B, N) CSR; items set in row b are never returned for query b.
            allowed: (N,) bool; items where it is False are never returned.

        Returns:
            ``(ids, scores, interests)``: (B, k) int64 item rows, best first; (B, k)
            float32 their best scores; (B, k) int64 the interest that gave each item
            its best score, the lower one on a tie. -1 / -inf / -1 where fewer than k
            items remain.
        """
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 3 or queries.shape[1] == 0:
            raise ValueError(
                f"queries must be a (B, K, D) array with K >= 1, got shape {queries.shape}"
            )
        B, K, D = queries.shape
        # width, k and exclude checked against B queries, so the messages name B
        _, exclude, allowed = check_search(self, queries[:, 0], k, exclude, allowed)
        repeated = None if exclude is None else exclude[np.repeat(np.arange(B), K)]  # (B*K, N)
        ids, scores = self.search(queries.reshape(B * K, D), k, repeated, allowed)  # (B*K, k)
        return _merge_interests(ids.reshape(B, K * k), scores.reshape(B, K * k), K, k)

    @abc.abstractmethod
    def save(self, folder: Path) -> None:
        """Writes the index into ``folder`` (created if needed), ``index.json`` included."""

    @classmethod
    @abc.abstractmethod
    def load(cls, folder: Path, mapped: bool = True) -> Index:
        """Reads what ``save`` wrote: mapped from its files where the kind can (processes
        serving one index share its pages), or into memory (``mapped=False``)."""

    @property
    @abc.abstractmethod
    def is_exact(self) -> bool:
        """Whether ``search`` always returns the true top k."""

    @property
    @abc.abstractmethod
    def num_items(self) -> int:
        """N, the number of indexed vectors (0 before ``build``)."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """D, the width of the indexed vectors."""


def check_vectors(vectors: np.ndarray, what: str = "vectors") -> np.ndarray:
    """``vectors`` as a C-contiguous (rows, D) float32 array of finite values."""
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"{what} must be a (rows, D) array with D >= 1, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return array


def check_added(index: Index, vectors: np.ndarray) -> np.ndarray:
    """``vectors`` checked for ``index.add``: (M, D) float32, finite, the index's width."""
    if index.num_items == 0:
        raise ValueError("add before build: build the index on its first vectors")
    vectors = check_vectors(vectors, "added vectors")
    if vectors.shape[1] != index.dim:
        raise ValueError(f"added vectors have width {vectors.shape[1]}, the index {index.dim}")
    return vectors


def check_search(
    index: Index,
    queries: np.ndarray,
    k: int,
    exclude: sp.csr_matrix | None,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, sp.csr_matrix | None, np.ndarray | None]:
    """Validated search arguments: (B, D) float32 queries, a (B, N) CSR or None, and an
    (N,) bool mask or None."""
    if index.num_items == 0:
        raise ValueError("search before build: the index holds no vectors")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    queries = check_vectors(queries, "queries")
    if queries.shape[1] != index.dim:
        raise ValueError(f"queries have width {queries.shape[1]}, the index {index.dim}")
    if allowed is not None:
        allowed = np.asarray(allowed)
        if allowed.dtype != np.bool_ or allowed.shape != (index.num_items,):
            raise ValueError(
                f"allowed must be a ({index.num_items},) bool array, got "
                f"{allowed.dtype} {allowed.shape}"
            )
    if exclude is None:
        return queries, None, allowed
    if not isinstance(exclude, sp.csr_matrix):
        exclude = sp.csr_matrix(exclude)
    if exclude.shape != (len(queries), index.num_items):
        raise ValueError(
            f"exclude must be ({len(queries)}, {index.num_items}), got {exclude.shape}"
        )
    return queries, exclude, allowed


def _merge_interests(
    ids: np.ndarray, scores: np.ndarray, K: int, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best k distinct items of (B, K*k) candidates laid out interest by interest.

    Returns:
        (B, k) ids, scores and interests as in ``Index.search_interests``.
    """
    interests = np.broadcast_to(np.repeat(np.arange(K, dtype=np.int64), k), ids.shape)
    # grouped by item, its best score and then its lowest interest first
    order = np.lexsort((interests, -scores, ids), axis=-1)
    ids, scores, interests = (
        np.take_along_axis(a, order, axis=1) for a in (ids, scores, interests)
    )
    dropped = ids < 0  # (B, K*k) padding, and every later copy of an item
    dropped[:, 1:] |= ids[:, 1:] == ids[:, :-1]
    order = np.lexsort((ids, -scores, dropped), axis=-1)[:, :k]  # kept first, best first
    ids, scores, interests, dropped = (
        np.take_along_axis(a, order, axis=1) for a in (ids, scores, interests, dropped)
    )
    return (
        np.where(dropped, -1, ids),
        np.where(dropped, -np.inf, scores).astype(np.float32),
        np.where(dropped, -1, interests),
    )


def write_meta(folder: Path, index: Index, **extra: Any) -> None:
    """Writes ``index.json``: the kind, the format version and the index's size."""
    meta = {
        "kind": index.kind,
        "format_version": FORMAT_VERSION,
        "num_items": index.num_items,
        "dim": index.dim,
        **extra,
    }
    text = json.dumps(meta, indent=2, sort_keys=True).encode("utf-8")
    atomic_write(folder / META_FILE, lambda f: f.write(text))


def read_meta(folder: Path) -> dict[str, Any]:
    """Reads ``index.json``; refuses a missing, corrupt or newer-format one."""
    path = Path(folder) / META_FILE
    meta = read_json(path, "no saved index here")
    if not isinstance(meta, dict) or not {"kind", "num_items", "dim"} <= meta.keys():
        raise DataError(f"{path}: not an index description (needs kind, num_items, dim)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: index format version {meta.get('format_version')} is not "
            f"{FORMAT_VERSION}, the one this version of twotower reads"
        )
    return meta
