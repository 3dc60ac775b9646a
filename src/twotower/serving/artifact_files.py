"""The artifact's files: their names, and reading and checking each one.

``artifact.py`` describes the layout and assembles an ``Artifact`` from these; every
reader here refuses a file that is missing, unreadable or at odds with the manifest,
naming it.
"""

from __future__ import annotations

import hashlib
import json
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
from twotower.serving.catalogue import ItemUpdate
from twotower.storage import atomic_write, load_array, read_json, sha256_file
from twotower.towers.config import ModelConfig
from twotower.towers.model import Tower, build_item_tower, build_query_tower

# 2: the known users' recent interactions (recent.npz) are the history they are served
# with; version 1 artifacts held them only inside the fitted features.
# 3: the item tower (item_tower.pt) and versions: updates/ changes the catalogue in place.
FORMAT_VERSION = 3
MANIFEST_FILE = "manifest.json"
FEATURES_DIR = "features"
QUERY_TOWER_FILE = "query_tower.pt"
ITEM_TOWER_FILE = "item_tower.pt"
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
# Each version after the first: updates/<version, six digits>/ holds these three files.
UPDATES_DIR = "updates"
UPDATE_ITEMS_FILE = "items.parquet"
UPDATE_VECTORS_FILE = "item_vectors.npy"
CHANGE_FILE = "change.json"
# What the loader reads from the manifest besides its format version.
MANIFEST_KEYS = (
    "version",
    "updates",
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
    ITEM_TOWER_FILE,
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
    return manifest_and_fingerprint(folder)[0]


def manifest_and_fingerprint(folder: Path) -> tuple[dict[str, Any], str]:
    """``manifest.json`` parsed and checked (as ``read_manifest``), and its fingerprint
    (the first 16 hex digits of its SHA-256), from one read of the file: an update
    replacing it meanwhile cannot pair one version's manifest with another's name."""
    path = folder / MANIFEST_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: missing; {folder} is not an exported artifact") from None
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: corrupt ({err})") from None
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
    _check_versions(path, manifest)
    return manifest, _fingerprint(data)


def fingerprint_of(manifest: dict[str, Any]) -> str:
    """The fingerprint of the version ``manifest`` describes: the first 16 hex digits of
    the SHA-256 of the manifest as written (``manifest_bytes``), as ``Artifact.load``
    names the version it reads."""
    return _fingerprint(manifest_bytes(manifest))


def _fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest as written: indented JSON with sorted keys (its fingerprint is
    the SHA-256 of exactly these bytes)."""
    return json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")


def write_manifest(folder: Path, manifest: dict[str, Any]) -> str:
    """Writes ``manifest.json`` atomically (the last file of a version); returns its
    fingerprint."""
    data = manifest_bytes(manifest)
    atomic_write(folder / MANIFEST_FILE, lambda f: f.write(data))
    return _fingerprint(data)


def update_folder(version: int) -> str:
    """The folder of version ``version``'s files (2 and above), inside the artifact."""
    return f"{UPDATES_DIR}/{version:06d}"


def _check_versions(path: Path, manifest: dict[str, Any]) -> None:
    """Refuses a manifest whose ``version`` and ``updates`` disagree: version 1 is the
    export, and the i-th update (from 0) makes version i + 2 in its own folder."""
    version, updates = manifest["version"], manifest["updates"]
    agree = (
        isinstance(version, int)
        and isinstance(updates, list)
        and version == len(updates) + 1
        and all(
            isinstance(entry, dict)
            and entry.get("version") == number + 2
            and entry.get("folder") == update_folder(number + 2)
            for number, entry in enumerate(updates)
        )
    )
    if not agree:
        raise DataError(
            f"{path}: version {version!r} and its updates disagree (version 1 is the "
            "export, each update the next, in updates/<version>)"
        )


def verify_files(folder: Path, manifest: dict[str, Any], skip: Sequence[str] = ()) -> None:
    """Checks that the folder holds exactly the listed files, each with its SHA-256
    (except the files named in ``skip``, which are not read: their presence only).

    What a killed update leaves is not read, and no error: its files under a version
    folder above the manifest's version, and a manifest it was writing. The next
    update removes them (``twotower.serving.updates``).
    """
    listed: dict[str, str] = manifest["files"]
    where = folder / MANIFEST_FILE
    for name in REQUIRED_FILES:
        if name not in listed:
            raise DataError(f"{where}: does not list {name}, which every artifact has")
    verify_listed(folder, manifest, [name for name in sorted(listed) if name not in skip])
    for name in skip:  # not read: present, where listed
        if name in listed and not (folder / name).is_file():
            raise DataError(f"{folder / name}: missing, though {MANIFEST_FILE} lists it")
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        unlisted = name != MANIFEST_FILE and name not in listed
        if unlisted and path.is_file() and not is_leftover(name, manifest["version"]):
            raise DataError(f"{path}: not listed in {MANIFEST_FILE}; the artifact was altered")


def verify_listed(folder: Path, manifest: dict[str, Any], names: Sequence[str]) -> None:
    """Checks each of ``names`` (files the manifest lists) against its SHA-256 there."""
    listed: dict[str, str] = manifest["files"]
    where = folder / MANIFEST_FILE
    for name in names:
        parts = PurePosixPath(name).parts
        if PurePosixPath(name).is_absolute() or ".." in parts or name == MANIFEST_FILE:
            raise DataError(f"{where}: lists {name!r}, which is not a file of the artifact")
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path}: missing, though {MANIFEST_FILE} lists it")
        if sha256_file(path) != listed[name]:
            raise DataError(f"{path}: corrupt (its checksum does not match {MANIFEST_FILE})")


def is_leftover(name: str, version: int) -> bool:
    """Whether the unlisted file ``name`` (relative to the artifact) is what an update
    killed on top of ``version`` left: anything in the folder of a later version, or
    a manifest being written (``atomic_write``'s temporary name)."""
    parts = PurePosixPath(name).parts
    if len(parts) == 1:
        return name.startswith(f".{MANIFEST_FILE}.") and name.endswith(".tmp")
    return parts[0] == UPDATES_DIR and len(parts) > 2 and folder_version(parts[1]) > version


def folder_version(name: str) -> int:
    """The version a folder of updates/ holds (its six digits), or -1 for another name."""
    return int(name) if len(name) == 6 and name.isdigit() and name.isascii() else -1


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
    table = read_parquet_any(path)
    if key not in table.column_names or table.num_rows != rows:
        raise DataError(f"{path}: expected {rows} rows with key column {key!r}")
    return table.combine_chunks()


def read_index(folder: Path, shape: tuple[int, int], mapped: bool = True) -> Index:
    """The item index, refused unless it holds ``shape`` (N, D) vectors; mapped from
    its files, or read into memory (``mapped=False``: an index that updates will grow)."""
    index = load_index(folder, mapped=mapped)
    if (index.num_items, index.dim) != shape:
        raise DataError(
            f"{folder}: the index holds {index.num_items} x {index.dim} "
            f"vectors, the manifest says {shape[0]} x {shape[1]}"
        )
    return index


def read_update(folder: Path, entry: dict[str, Any], schema: pa.Schema, dim: int) -> ItemUpdate:
    """One version's files (``updates/<version>/``) as the ``ItemUpdate`` they hold.

    Args:
        folder: the artifact folder.
        entry: the version's entry in the manifest's ``updates``.
        schema: the item table's schema, which its rows must have.
        dim: the width of the item vectors.

    Raises:
        DataError: a file unreadable or at odds with the entry or the item table (named).
    """
    where = folder / entry["folder"]
    path = where / UPDATE_ITEMS_FILE
    rows = read_parquet_any(path)
    if not rows.schema.equals(schema, check_metadata=False):
        raise DataError(f"{path}: its columns are not the item table's ({schema.names})")
    vectors = load_array(where / UPDATE_VECTORS_FILE, (rows.num_rows, dim), mapped=False)
    change = read_json(where / CHANGE_FILE, "missing")
    lists = {n: change.get(n) if isinstance(change, dict) else None for n in CHANGE_LISTS}
    if not _agrees(entry, rows.num_rows, lists):
        raise DataError(f"{where}: its files disagree with the manifest's entry {entry}")
    return ItemUpdate(
        rows.combine_chunks(),
        vectors,
        *(tuple(lists[name]) for name in CHANGE_LISTS),
        added=entry["added"],
        replaced=entry["replaced"],
        version=entry["version"],
    )


CHANGE_LISTS = ("blocked", "unblocked", "removed")  # change.json's id lists, in this order


def _agrees(entry: dict[str, Any], rows: int, lists: dict[str, Any]) -> bool:
    """Whether an update's files agree with its manifest entry: its rows are the added
    and replaced ones, and each id list as long as the entry counts."""
    added, replaced = entry.get("added"), entry.get("replaced")
    return (
        isinstance(added, int)
        and isinstance(replaced, int)
        and added + replaced == rows
        and all(isinstance(ids, list) and entry.get(n) == len(ids) for n, ids in lists.items())
    )


def read_parquet_any(path: Path) -> pa.Table:
    """A Parquet file's table, whatever it holds; refused by name if unreadable."""
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None


def read_item_tower(path: Path, config: ModelConfig, pipeline: FeaturePipeline) -> Tower:
    """Builds the item tower's shape from the config and features, then loads its weights."""
    return _load_weights(path, build_item_tower(config, pipeline.config, pipeline), "an item")


def read_query_tower(path: Path, config: ModelConfig, pipeline: FeaturePipeline) -> Tower:
    """Builds the query tower's shape from the config and features, then loads its weights.

    The query tower's state includes any item-id table its history features share
    with the item tower, so it loads completely on its own.
    """
    return _load_weights(path, build_query_tower(config, pipeline.config, pipeline), "a query")


def _load_weights(path: Path, tower: Tower, side: str) -> Tower:
    """``tower`` with the weights of ``path``, in evaluation mode, without gradients."""
    try:
        # mapped, not read (its tables may be the item table): processes share its pages
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        tower.load_state_dict(state, assign=True)
    except Exception as err:  # torch raises several types for a bad or mismatched file
        raise DataError(f"{path}: not {side} tower of this config ({err})") from None
    return tower.eval().requires_grad_(False)
