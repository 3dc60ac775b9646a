"""The artifact's files: their names, and reading and checking each one.

``artifact.py`` describes the layout and assembles an ``Artifact`` from these; every
reader here refuses a file that is missing, unreadable or at odds with the manifest,
naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from twotower.errors import DataError
from twotower.features.history import RecentLists
from twotower.features.pipeline import ARRAYS_FILE, STATE_FILE, FeaturePipeline
from twotower.index import Index, load_index
from twotower.index.base import META_FILE
from twotower.storage import atomic_write, read_json, sha256_file
from twotower.towers.config import ModelConfig
from twotower.towers.model import Tower, build_query_tower

# 2: the known users' recent interactions (recent.npz) are the history they are served
# with; version 1 artifacts held them only inside the fitted features
FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
FEATURES_DIR = "features"
QUERY_TOWER_FILE = "query_tower.pt"
ITEM_VECTORS_FILE = "item_vectors.npy"
ITEMS_FILE = "items.parquet"
QUERIES_FILE = "queries.parquet"
SEEN_FILE = "seen.npz"
RECENT_FILE = "recent.npz"
# Optional: each known query's held-out test items under the run's split (the explorer
# marks them); read where the manifest lists it.
HELDOUT_FILE = "heldout.npz"
INDEX_DIR = "index"
# Optional: the query tower as an ONNX graph (twotower.towers.onnx), its weights
# beside it in query_tower.onnx.data.
ONNX_FILE = "onnx/query_tower.onnx"
# What the loader reads from the manifest besides its format version.
MANIFEST_KEYS = (
    "files",
    "config",
    "query_key",
    "item_key",
    "num_items",
    "num_queries",
    "embedding_dim",
    "index",
)
# Files every artifact has, whatever its index kind adds under index/.
REQUIRED_FILES = (
    f"{FEATURES_DIR}/{STATE_FILE}",
    f"{FEATURES_DIR}/{ARRAYS_FILE}",
    QUERY_TOWER_FILE,
    ITEM_VECTORS_FILE,
    ITEMS_FILE,
    QUERIES_FILE,
    SEEN_FILE,
    RECENT_FILE,
    f"{INDEX_DIR}/{META_FILE}",
)
# The known users' files: not read (nor hashed) by a service whose users' state lives
# in an online store (``Artifact.load(..., users=False)``).
USER_FILES = (QUERIES_FILE, SEEN_FILE, RECENT_FILE, HELDOUT_FILE)


def read_manifest(folder: Path) -> dict[str, Any]:
    """Parses ``manifest.json``; refuses a missing, corrupt or other-version manifest."""
    path = folder / MANIFEST_FILE
    manifest = read_json(path, f"missing; {folder} is not an exported artifact")
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: not an artifact manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise DataError(
            f"{path}: artifact format version {version!r} is "
            f"{'newer than' if newer else 'not'} {FORMAT_VERSION}, the one this version of "
            f"twotower reads; "
            + ("upgrade twotower to load it" if newer else "export the run again (twotower export)")
        )
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing or not isinstance(manifest["files"], dict):
        raise DataError(f"{path}: not an artifact manifest (lacks {', '.join(missing)})")
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any], skip: Sequence[str] = ()) -> None:
    """Checks that the folder holds exactly the listed files, each with its SHA-256
    (except the files named in ``skip``, which are not read: their presence only)."""
    listed: dict[str, str] = manifest["files"]
    where = folder / MANIFEST_FILE
    for name in REQUIRED_FILES:
        if name not in listed:
            raise DataError(f"{where}: does not list {name}, which every artifact has")
    for name, digest in sorted(listed.items()):
        parts = PurePosixPath(name).parts
        if PurePosixPath(name).is_absolute() or ".." in parts or name == MANIFEST_FILE:
            raise DataError(f"{where}: lists {name!r}, which is not a file of the artifact")
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path}: missing, though {MANIFEST_FILE} lists it")
        if name not in skip and sha256_file(path) != digest:
            raise DataError(f"{path}: corrupt (its checksum does not match {MANIFEST_FILE})")
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name != MANIFEST_FILE and name not in listed:
            raise DataError(f"{path}: not listed in {MANIFEST_FILE}; the artifact was altered")


def save_recent(path: Path, recent: RecentLists) -> None:
    """Writes ``recent.npz``: the ragged arrays, no pickle."""
    atomic_write(
        path,
        lambda f: np.savez(f, indptr=recent.indptr, rows=recent.rows, times=recent.times),
    )


def load_recent(path: Path, num_queries: int, num_items: int) -> RecentLists:
    """Reads ``recent.npz``, refusing arrays of another shape or rows outside the items.

    Raises:
        DataError: the file is unreadable or inconsistent (named).
    """
    try:
        with np.load(path, allow_pickle=False) as arrays:
            indptr, rows, times = arrays["indptr"], arrays["rows"], arrays["times"]
    except (ValueError, OSError, EOFError, KeyError) as err:
        raise DataError(f"{path}: not readable recent-interaction arrays ({err})") from None
    consistent = (
        len(indptr) == num_queries + 1
        and indptr[-1] == len(rows) == len(times)
        and (np.diff(indptr) >= 0).all()
        and (len(rows) == 0 or (rows.min() >= 0 and rows.max() < num_items))
    )
    if not consistent:
        raise DataError(
            f"{path}: expected the recent items of {num_queries} queries among {num_items}"
        )
    return RecentLists(indptr.astype(np.int64), rows.astype(np.int64), times.astype(np.float64))


NO_RECENT = RecentLists(np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0))


def read_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None


def read_parquet(path: Path, key: str, rows: int) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    if key not in table.column_names or table.num_rows != rows:
        raise DataError(f"{path}: expected {rows} rows with key column {key!r}")
    return table.combine_chunks()


def read_index(folder: Path, shape: tuple[int, int]) -> Index:
    """The item index, refused unless it holds ``shape`` (N, D) vectors."""
    index = load_index(folder)
    if (index.num_items, index.dim) != shape:
        raise DataError(
            f"{folder}: the index holds {index.num_items} x {index.dim} "
            f"vectors, the manifest says {shape[0]} x {shape[1]}"
        )
    return index


def read_query_tower(path: Path, config: ModelConfig, pipeline: FeaturePipeline) -> Tower:
    """Builds the query tower's shape from the config and features, then loads its weights.

    The query tower's state includes any item-id table its history features share
    with the item tower, so it loads completely on its own.
    """
    tower = build_query_tower(config, pipeline.config, pipeline)
    try:
        # mapped, not read (its tables may be the item table): processes share its pages
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        tower.load_state_dict(state, assign=True)
    except Exception as err:  # torch raises several types for a bad or mismatched file
        raise DataError(f"{path}: not a query tower of this config ({err})") from None
    return tower.eval().requires_grad_(False)
