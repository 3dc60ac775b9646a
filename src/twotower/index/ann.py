"""FAISS indexes behind the ``Index`` interface: flat inner product, HNSW and IVF-PQ.

All three score by inner product (item vectors are unit vectors, so this is the
cosine). What a query may not return is one selector the search consults as it goes,
never a longer list fetched and filtered: an ``IDSelectorBitmap`` over the allowed
items (``Index.search``'s ``allowed``, shared by the queries of a call) with the
query's own excluded items cleared. HNSW walks the graph through left-out items but
never returns them; IVF skips them in its lists; the flat scan skips them. A FAISS
search takes one set of parameters for all its queries, so queries are searched
together where they leave out the same items (those that leave out none, above all),
and each other query alone, with the bits of its exclusions cleared for its call
(one bitmap per call, its bits restored after each query's search).

Excluded items still take places in HNSW's candidate list as the walk passes them,
so a query that excludes e items searches with ``efSearch`` at least k + e: the walk
as wide as it would be to find k + e items. It then answers, item for item, what
asking for k + e and dropping the excluded ones would answer, and the same whatever
else is in its batch. IVF-PQ and flat answer exactly that too (they scan what they
scan, whatever is asked; flat's scores up to the last bit, as FAISS scores 20 or more
queries of one call with BLAS and fewer one by one). ``flat`` is exact (FAISS's
brute force); ``hnsw`` and ``ivfpq`` trade recall for speed, measured against
``ExactIndex`` at export.

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
        """The search parameters of a search whose queries leave out ``wanted - k``
        items besides the k they want (HNSW widens its walk to ``wanted``), with
        ``selector`` (None: every item)."""
        return _faiss().SearchParameters(sel=selector)

    def _setting(self, wanted: int) -> int:
        """What of ``_parameters`` depends on ``wanted`` (searches that agree on it and
        on the selector share their parameters): nothing here."""
        return 0

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
        """The top k by inner product among the ``allowed`` items that each query does
        not exclude, left out inside the search; see ``Index.search``."""
        queries, exclude, allowed = check_search(self, queries, k, exclude, allowed)
        B, N = len(queries), self.num_items
        ids = np.full((B, k), -1, dtype=np.int64)
        scores = np.full((B, k), -np.inf, dtype=np.float32)
        found = min(k, N)  # FAISS pads past N itself; asked for at most N here
        selection = _Selection(exclude, allowed, B, N)
        made: dict[tuple[int, bool], Any] = {}  # FAISS's Python wrapper makes them slowly
        for positions, start, end in selection.groups:
            wanted = min(k + end - start, N)
            key = (self._setting(wanted), selection.needed(start, end))
            if key not in made:
                made[key] = self._parameters(wanted, selection.selector if key[1] else None)
            saved = selection.clear(start, end)
            alone = isinstance(positions, int)
            rows = slice(positions, positions + 1) if alone else positions
            if alone and found == k:  # FAISS writes into the row itself
                self._index.search(queries[rows], k, params=made[key], D=scores[rows], I=ids[rows])
            else:
                top, found_ids = self._index.search(queries[rows], found, params=made[key])
                ids[rows, :found], scores[rows, :found] = found_ids, top
            selection.restore(start, end, saved)
        scores[ids < 0] = -np.inf  # FAISS pads an inner-product search with -FLT_MAX
        return ids, scores

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
        return faiss.SearchParametersHNSW(sel=selector, efSearch=self._setting(wanted))

    def _setting(self, wanted: int) -> int:
        return max(self.ef_search, wanted)  # efSearch


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


class _Selection:
    """What each query of one search may return: the bits of an ``IDSelectorBitmap``
    (one per item, little-endian within a byte, as FAISS reads them), shared by the
    call's queries, in which a query's excluded items are cleared for its own search.

    ``groups`` lists the queries that leave out the same items, searched together:
    (position, or an array of positions, and the range of ``exclude.indices`` that
    holds their excluded items), the group that excludes nothing first.

    Args:
        exclude: (B, N) CSR, or None.
        allowed: (N,) bool, or None.
    """

    def __init__(
        self, exclude: sp.csr_matrix | None, allowed: np.ndarray | None, B: int, N: int
    ) -> None:
        self.masked = allowed is not None
        excluding = exclude is not None and exclude.nnz > 0
        self.groups = _groups(exclude, B) if excluding else [(np.arange(B), 0, 0)]
        self.bits, self.selector = None, None
        if self.masked or excluding:  # FAISS reads the bits in place while it searches
            self.bits = (
                np.packbits(allowed, bitorder="little")
                if self.masked
                else np.full((N + 7) // 8, 0xFF, dtype=np.uint8)
            )
            faiss = _faiss()
            self.selector = faiss.IDSelectorBitmap(len(self.bits), faiss.swig_ptr(self.bits))
        if excluding:  # each excluded item's byte, and that byte with its bit cleared
            self.places = (exclude.indices >> 3).astype(np.int64)
            self.masks = ~np.left_shift(1, exclude.indices & 7).astype(np.uint8)

    def needed(self, start: int, end: int) -> bool:
        """Whether the group whose exclusions are ``[start, end)`` needs the selector
        (without one, FAISS searches every item its fastest way)."""
        return self.masked or end > start

    def clear(self, start: int, end: int) -> np.ndarray | None:
        """Clears the bits of the excluded items ``[start, end)``; returns their bytes as
        they were, for ``restore``."""
        if end == start:
            return None
        places = self.places[start:end]
        saved = self.bits[places]  # a copy, read before any bit is cleared
        np.bitwise_and.at(self.bits, places, self.masks[start:end])
        return saved

    def restore(self, start: int, end: int, saved: np.ndarray | None) -> None:
        """Puts back the bytes ``clear`` changed."""
        if saved is not None:
            self.bits[self.places[start:end]] = saved


def _groups(exclude: sp.csr_matrix, B: int) -> list[tuple[int | np.ndarray, int, int]]:
    """The queries that leave out the same items: (a position, or an array of them;
    and their items' range in ``exclude.indices``), those that exclude nothing first."""
    indptr = exclude.indptr.tolist()
    groups: dict[bytes, list[int]] = {}
    plain = []
    for position in range(B):
        start, end = indptr[position], indptr[position + 1]
        if start == end:
            plain.append(position)
        else:
            groups.setdefault(exclude.indices[start:end].tobytes(), []).append(position)
    found: list[tuple[int | np.ndarray, int, int]] = [(np.array(plain), 0, 0)] if plain else []
    for positions in groups.values():
        first = positions[0] if len(positions) == 1 else np.array(positions)
        found.append((first, indptr[positions[0]], indptr[positions[0] + 1]))
    return found
