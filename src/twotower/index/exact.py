"""The exact index: every query scored against every item, the reference for ANN indexes.

Scores are one matrix product per chunk of queries; the top k is the exact,
tie-deterministic ``twotower.index.topk.top_k`` (equal scores go to the lower item
row) that evaluation ranks with too, so a search gives the same answer for any chunk
size and on any device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from twotower.errors import DataError
from twotower.index.base import (
    Index,
    check_added,
    check_search,
    check_vectors,
    read_meta,
    write_meta,
)
from twotower.index.topk import top_k
from twotower.storage import load_array, save_array

VECTORS_FILE = "vectors.npy"
GROWTH = 1.25  # a new buffer holds this many times the rows it must


class ExactIndex(Index):
    """Brute-force inner-product search: (B, D) @ (D, N) in chunks of queries.

    Args:
        chunk_size: queries scored at once; bounds memory at ``chunk_size x N`` scores.
        device: where the vectors live and the scores are computed (``cpu``, ``cuda``).
    """

    kind = "exact"

    def __init__(self, chunk_size: int = 1024, device: str = "cpu") -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.device = torch.device(device)
        self._vectors = torch.zeros((0, 0), dtype=torch.float32)  # the filled rows
        self._buffer: torch.Tensor | None = None  # what ``add`` writes into, if any

    @classmethod
    def over(cls, vectors: np.ndarray, chunk_size: int = 1024) -> ExactIndex:
        """An index on the CPU over ``vectors`` themselves, not a copy: a mapped file
        stays mapped (and shared between the processes that map it)."""
        index = cls(chunk_size=chunk_size)
        index._vectors = torch.from_numpy(check_vectors(vectors, "item vectors"))
        return index

    def build(self, vectors: np.ndarray) -> None:
        """Keeps a float32 copy of the (N, D) item vectors on the index's device."""
        vectors = check_vectors(vectors, "item vectors")
        self._vectors = torch.from_numpy(vectors.copy()).to(self.device)
        self._buffer = None

    def add(self, vectors: np.ndarray) -> None:
        """Appends (M, D) vectors as items N..N+M-1; see ``Index.add``.

        Earlier rows are never written: a search that began before keeps its view.
        """
        vectors = check_added(self, vectors)
        filled, count = self.num_items, len(vectors)
        if self._buffer is None or filled + count > len(self._buffer):
            rows = max(filled + count, int(GROWTH * (filled + count)))
            buffer = torch.empty((rows, self.dim), dtype=torch.float32, device=self.device)
            buffer[:filled] = self._vectors
            self._buffer = buffer
        self._buffer[filled : filled + count] = torch.from_numpy(vectors).to(self.device)
        self._vectors = self._buffer[: filled + count]

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: sp.csr_matrix | None = None,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The exact top k by inner product; see ``Index.search``.

        A query's exclusions and the shared ``allowed`` mask make one selection: with
        a narrow mask only the items it keeps are scored (their vectors gathered, at
        most half the corpus), with a wide one every item is scored and the others get
        -inf; then each query's excluded items get -inf, one scatter over the whole
        batch (``top_k``). The same answer either way, ties to the lower item row.
        """
        queries, exclude, allowed = check_search(self, queries, k, exclude, allowed)
        query_vectors = torch.from_numpy(queries).to(self.device)  # (B, D)
        vectors, kept, blocked = self._vectors, None, None
        if allowed is not None and 2 * int(allowed.sum()) <= len(allowed):
            kept = np.flatnonzero(allowed)  # (M,) the items scored, ascending
            vectors = self._vectors[torch.from_numpy(kept).to(self.device)]
            exclude = None if exclude is None else _among(exclude, allowed)
        elif allowed is not None:
            blocked = torch.from_numpy(~allowed).to(self.device)
        if len(vectors) == 0:
            return np.full((len(queries), k), -1, np.int64), np.full(
                (len(queries), k), -np.inf, np.float32
            )

        def score_fn(rows: np.ndarray) -> torch.Tensor:
            chunk = query_vectors[torch.from_numpy(rows).to(self.device)]
            scores = chunk @ vectors.T  # (chunk, N) or (chunk, M)
            return scores if blocked is None else scores.masked_fill_(blocked, -torch.inf)

        ids, scores = top_k(
            score_fn,
            np.arange(len(queries)),
            k,
            exclude=exclude,
            chunk_size=self.chunk_size,
            num_items=len(vectors),
        )
        if kept is not None:  # positions among the kept items -> item rows
            ids = np.where(ids >= 0, kept[np.maximum(ids, 0)], -1)
        return ids, scores

    def save(self, folder: Path) -> None:
        """Writes ``index.json`` and the vectors as ``vectors.npy``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_array(folder / VECTORS_FILE, self._vectors.cpu().numpy())
        write_meta(folder, self)

    @classmethod
    def load(
        cls, folder: Path, mapped: bool = True, chunk_size: int = 1024, device: str = "cpu"
    ) -> ExactIndex:
        """Reads what ``save`` wrote; refuses vectors that disagree with ``index.json``.

        Args:
            mapped: on the CPU, map the file (copy-on-write) rather than read it; a
                mapped index still grows (``add`` copies its rows into memory first).
        """
        folder = Path(folder)
        meta = read_meta(folder)
        if meta["kind"] != cls.kind:
            raise DataError(f"{folder}: holds a {meta['kind']!r} index, not {cls.kind!r}")
        shape = (meta["num_items"], meta["dim"])
        on_cpu = device == "cpu"
        vectors = load_array(folder / VECTORS_FILE, shape, mapped=mapped and on_cpu)
        if on_cpu:  # mapped: the file itself, whose pages processes serving it share
            return cls.over(vectors, chunk_size)
        index = cls(chunk_size=chunk_size, device=device)
        index.build(vectors)
        return index

    @property
    def is_exact(self) -> bool:
        return True

    @property
    def num_items(self) -> int:
        return self._vectors.shape[0]

    @property
    def dim(self) -> int:
        return self._vectors.shape[1]


def _among(exclude: sp.csr_matrix, allowed: np.ndarray) -> sp.csr_matrix:
    """(B, M) ``exclude`` over the M allowed items only (column j: the j-th allowed
    item); excluded items that are not allowed are dropped (they are never scored)."""
    position = np.cumsum(allowed) - 1  # (N,) an allowed item's place among the M
    kept = allowed[exclude.indices]  # (nnz,)
    indptr = np.concatenate([[0], np.cumsum(kept)])[exclude.indptr]
    columns = position[exclude.indices[kept]]
    ones = np.ones(len(columns), dtype=np.float32)
    return sp.csr_matrix((ones, columns, indptr), shape=(exclude.shape[0], int(allowed.sum())))
