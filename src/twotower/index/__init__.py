"""Item indexes behind one interface: build on item vectors, search by inner product.

base.py   the ``Index`` interface, argument checks, ``index.json``
exact.py  ``ExactIndex``: brute force in chunks, the reference for approximate indexes
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from twotower.errors import ConfigError, DataError
from twotower.index.base import META_FILE, Index, read_meta
from twotower.index.exact import ExactIndex

INDEXES: dict[str, type[Index]] = {
    "exact": ExactIndex,
}


def build_index(kind: str, vectors: np.ndarray) -> Index:
    """A new index of ``kind`` (a key of ``INDEXES``) built on (N, D) float32 vectors."""
    if kind not in INDEXES:
        raise ConfigError(f"unknown index {kind!r}; choose one of {', '.join(INDEXES)}")
    index = INDEXES[kind]()
    index.build(vectors)
    return index


def load_index(folder: Path) -> Index:
    """The index saved in ``folder``, of whatever kind its ``index.json`` names."""
    kind = read_meta(folder)["kind"]
    if kind not in INDEXES:
        raise DataError(
            f"{Path(folder) / META_FILE}: unknown index kind {kind!r}; this version of "
            f"twotower reads {', '.join(INDEXES)}"
        )
    return INDEXES[kind].load(folder)


__all__ = ["INDEXES", "ExactIndex", "Index", "build_index", "load_index"]
