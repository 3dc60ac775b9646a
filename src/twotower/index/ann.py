"""FAISS indexes behind the ``Index`` interface: flat inner product, HNSW and IVF-PQ.

All three score by inner product (item vectors are unit vectors, so this is the
cosine). Seen-item exclusion must not cost recall: a query asks FAISS for k plus the
number of items it excludes, the excluded ones are dropped, and the first k that
remain are kept. A mask of allowed items (``Index.search``'s ``allowed``) is FAISS's
own: an ``IDSelectorBitmap`` in the search parameters, which the search consults as it
goes (HNSW walks the graph through left-out items but never returns them; IVF skips
them in its lists), so it costs no over-fetching. ``flat`` is exact (FAISS's brute
force); ``hnsw`` and ``ivfpq`` trade recall for speed, measured against ``ExactIndex``
at export.

``add`` is FAISS's own: the new vectors get the next sequential ids, which are the
positions ``Index.add`` promises (a flat index appends them; HNSW links each into the
graph as it would have while building; IVF-PQ encodes each with the quantizers trained
at build time and appends it to its list, so vectors far from the trained data are
coded less well). A loaded index is mapped from its file (``IO_FLAG_MMAP_IFC``: the
pages are shared by every process that serves it), and FAISS cannot grow a mapped
index (it would abort the process), so ``add`` refuses one and ``growable`` copies
it into memory first; ``load(mapped=False)`` reads it into memory directly.

Saved with FAISS's own binary format (``faiss.index``), never pickle.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from twotower.errors import ConfigError, DataError
from twotower.index.base import (
    Index,
    check_added,
    check_search,
    check_vectors,
    read_meta,
    write_meta,
)

FAISS_FILE = "faiss.index"


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ConfigError(
            "FAISS indexes need the faiss-cpu package: pip install 'twotower[serve]'"
        ) from None
    return faiss


class FaissIndex(Index):
    """The shared part: exclusion-aware search, save and load; subclasses make the index."""

    def __init__(self) -> None:
        self._index: Any = None
        self._mapped = False  # read with IO_FLAG_MMAP_IFC: its arrays cannot grow

    def _make(self, vectors: np.ndarray) -> Any:
        raise NotImplementedError

    def _parameters(self, wanted: int, selector: Any) -> Any:
        """The search parameters of a search for ``wanted`` results, with ``selector``
        (None: every item)."""
        return _faiss().SearchParameters(sel=selector)

    def build(self, vectors: np.ndarray) -> None:
        """Trains (where the kind needs it) and fills the index with (N, D) vectors."""
        vectors = check_vectors(vectors, "item vectors")
        self._index = self._make(vectors)
        self._index.add(vectors)
        self._mapped = False

    def add(self, vectors: np.ndarray) -> None:
        """Appends (M, D) vectors with FAISS's ``add`` (ids N..N+M-1); see ``Index.add``.

        Raises:
            RuntimeError: the index is mapped from its file (``load(mapped=True)``),
                where FAISS would abort the process; ``growable()`` gives a copy that
                can grow.
        """
        vectors = check_added(self, vectors)
        if self._mapped:
            raise RuntimeError(
                f"this {self.kind} index is mapped read-only from its file and cannot grow; "
                "add to index.growable() (an in-memory copy), or load it with mapped=False"
            )
        self._index.add(vectors)

    def growable(self) -> FaissIndex:
        """This index, or where it is mapped from its file, an in-memory copy of it (the
        copy costs the index's size in memory; the mapped pages stay shared)."""
        if not self._mapped:
            return self
        faiss = _faiss()
        copy = self._copy_settings()
        copy._index = faiss.deserialize_index(faiss.serialize_index(self._index))
        return copy

    def _copy_settings(self) -> FaissIndex:
        """An empty index of this kind with this one's search settings."""
        return type(self)()

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: sp.csr_matrix | None = None,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The top k by inner product, excluded items dropped, only ``allowed`` ones
        searched; see ``Index.search``."""
        queries, exclude, allowed = check_search(self, queries, k, exclude, allowed)
        extra = 0 if exclude is None else int(np.diff(exclude.indptr).max(initial=0))
        wanted = min(k + extra, self.num_items)
        bits = None if allowed is None else np.packbits(allowed, bitorder="little")
        selector = None
        if bits is not None:  # reads ``bits`` in place: kept alive until the search ends
            faiss = _faiss()
            selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))
        parameters = self._parameters(wanted, selector)
        scores, ids = self._index.search(queries, wanted, params=parameters)  # -1 where none
        return _drop_excluded(ids.astype(np.int64), scores.astype(np.float32), exclude, k)

    def save(self, folder: Path) -> None:
        """Writes ``index.json`` and ``faiss.index`` (FAISS's binary format)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _faiss().write_index(self._index, str(folder / FAISS_FILE))
        write_meta(folder, self)

    @classmethod
    def load(cls, folder: Path, mapped: bool = True) -> FaissIndex:
        """Reads what ``save`` wrote; refuses a file that disagrees with ``index.json``.

        Args:
            mapped: map the file (processes serving one index share its pages; such an
                index cannot ``add``) rather than read it into memory.
        """
        folder = Path(folder)
        meta = read_meta(folder)
        if meta["kind"] != cls.kind:
            raise DataError(f"{folder}: holds a {meta['kind']!r} index, not {cls.kind!r}")
        path = folder / FAISS_FILE
        if not path.is_file():
            raise DataError(f"{path}: missing")
        try:
            faiss = _faiss()
            raw = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mapped else 0)
        except RuntimeError as err:
            raise DataError(f"{path}: not a readable FAISS index ({err})") from None
        if (raw.ntotal, raw.d) != (meta["num_items"], meta["dim"]):
            raise DataError(
                f"{path}: holds {raw.ntotal} vectors of width {raw.d}, index.json says "
                f"{meta['num_items']} of width {meta['dim']}"
            )
        index = cls()
        index._index, index._mapped = raw, mapped
        return index

    @property
    def is_exact(self) -> bool:
        return False

    @property
    def num_items(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return 0 if self._index is None else int(self._index.d)


class FlatIndex(FaissIndex):
    """FAISS brute-force inner product: exact, and fast on CPU with BLAS."""

    kind = "flat"

    def _make(self, vectors: np.ndarray) -> Any:
        faiss = _faiss()
        return faiss.IndexFlatIP(vectors.shape[1])

    @property
    def is_exact(self) -> bool:
        return True


class HNSWIndex(FaissIndex):
    """A graph index (HNSW): sub-linear search, no training.

    Args:
        neighbors: graph degree M (memory and recall grow with it).
        ef_construction: candidate list size while building.
        ef_search: candidate list size while searching (at least the results asked for).
    """

    kind = "hnsw"

    def __init__(
        self, neighbors: int = 32, ef_construction: int = 200, ef_search: int = 128
    ) -> None:
        super().__init__()
        self.neighbors = neighbors
        self.ef_construction = ef_construction
        self.ef_search = ef_search

    def _make(self, vectors: np.ndarray) -> Any:
        faiss = _faiss()
        index = faiss.IndexHNSWFlat(vectors.shape[1], self.neighbors, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        return index

    def _copy_settings(self) -> HNSWIndex:
        return HNSWIndex(self.neighbors, self.ef_construction, self.ef_search)

    def _parameters(self, wanted: int, selector: Any) -> Any:
        faiss = _faiss()
        return faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.ef_search, wanted))


class IVFPQIndex(FaissIndex):
    """Inverted lists over product-quantized vectors: small memory, for large corpora.

    The number of lists defaults to about 4 sqrt(N), kept low enough that each list's
    centroid is trained on at least 39 vectors; the code has ``subquantizers`` parts
    per vector (the largest divisor of D no larger than it), each with up to 256
    centroids (fewer on a small corpus, again at least 39 vectors per centroid).

    Args:
        nprobe: lists visited per query (recall grows with it).
        subquantizers: bytes per compressed vector (the PQ ``m``).
    """

    kind = "ivfpq"

    def __init__(self, nprobe: int = 16, subquantizers: int = 16) -> None:
        super().__init__()
        self.nprobe = nprobe
        self.subquantizers = subquantizers

    def _make(self, vectors: np.ndarray) -> Any:
        faiss = _faiss()
        count, dim = vectors.shape
        lists = max(1, min(int(4 * math.sqrt(count)), count // 39))
        m = max(d for d in range(1, min(self.subquantizers, dim) + 1) if dim % d == 0)
        # each of the 2^bits PQ centroids wants about 39 training vectors
        bits = max(1, min(8, int(math.log2(max(count / 39, 2)))))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, lists, m, bits, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        return index

    def _copy_settings(self) -> IVFPQIndex:
        return IVFPQIndex(self.nprobe, self.subquantizers)

    def _parameters(self, wanted: int, selector: Any) -> Any:
        faiss = _faiss()
        return faiss.SearchParametersIVF(sel=selector, nprobe=min(self.nprobe, self._index.nlist))


def _drop_excluded(
    ids: np.ndarray, scores: np.ndarray, exclude: sp.csr_matrix | None, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Removes excluded and missing (-1) results, keeps the order, pads to (B, k)."""
    bad = ids < 0
    if exclude is not None and ids.size and exclude.nnz:
        # (row, item) pairs as one int64 each, looked up among the excluded pairs
        width = exclude.shape[1]
        found = np.arange(len(ids))[:, None] * width + np.where(bad, 0, ids)
        rows = np.repeat(np.arange(exclude.shape[0]), np.diff(exclude.indptr))
        bad |= np.isin(found, rows * width + exclude.indices)
    order = np.argsort(bad, axis=1, kind="stable")  # kept results first, in rank order
    ids = np.take_along_axis(np.where(bad, -1, ids), order, axis=1)
    scores = np.take_along_axis(np.where(bad, -np.inf, scores), order, axis=1)
    out_ids = np.full((len(ids), k), -1, dtype=np.int64)
    out_scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
    width = min(k, ids.shape[1])
    out_ids[:, :width] = ids[:, :width]
    out_scores[:, :width] = scores[:, :width]
    return out_ids, out_scores
