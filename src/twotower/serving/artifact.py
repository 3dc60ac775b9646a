"""The artifact format: everything retrieval needs, written here and verified file by
file when loaded. This module and ``artifact_files.py`` alone know the layout (no
pickle anywhere):

    manifest.json        format version, package version, creation time, resolved config,
                         the run's metrics, sizes, index kind, and {file: sha256} of
                         every other file
    features/            the fitted feature state; histories cover every logged interaction
    query_tower.pt       the query tower's state_dict (tensors only)
    item_vectors.npy     (N, D) float32 item vectors, row i = row i of items.parquet
    items.parquet        the raw item table: the corpus, its key and feature columns
    queries.parquet      the raw query table of the known queries (users)
    seen.npz             CSR arrays (indptr, indices, shape): the logged items of each query
    recent.npz           each query's latest interactions, most recent first, as many as
                         the longest history feature reads: ``indptr`` (Q + 1,), ``rows``
                         item rows, ``times`` timestamps (NaN: none); with the query's row
                         of queries.parquet and of seen.npz, the state a user is served
                         from until events change it (``twotower.serving.stores``)
    heldout.npz          optional: the same for each query's test items under the split
    index/               the item index (``index/index.json`` names its kind)
    onnx/                optional (``twotower export --onnx``): query_tower.onnx, the query
                         tower as an ONNX graph, and its weights (query_tower.onnx.data);
                         the manifest's ``onnx`` entry holds its input contract

``write_artifact`` writes a folder (``twotower.export`` fills it from a run and swaps
it into place); ``Artifact.load`` reads one back, each file through its reader in
``artifact_files.py`` (which also names the files).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
import torch

from twotower.config_io import from_dict
from twotower.features.history import RecentLists
from twotower.features.pipeline import FeaturePipeline
from twotower.index import Index
from twotower.serving.artifact_files import (
    FEATURES_DIR,
    FORMAT_VERSION,
    HELDOUT_FILE,
    INDEX_DIR,
    ITEM_VECTORS_FILE,
    ITEMS_FILE,
    MANIFEST_FILE,
    MANIFEST_KEYS,
    NO_RECENT,
    ONNX_FILE,
    QUERIES_FILE,
    QUERY_TOWER_FILE,
    RECENT_FILE,
    REQUIRED_FILES,
    SEEN_FILE,
    USER_FILES,
    load_recent,
    read_index,
    read_manifest,
    read_parquet,
    read_query_tower,
    read_schema,
    save_recent,
    verify_files,
)
from twotower.serving.keys import KeyIndex
from twotower.storage import atomic_write, load_array, load_csr, save_array, save_csr, sha256_file
from twotower.towers.config import ModelConfig
from twotower.towers.model import Tower


@dataclasses.dataclass(frozen=True)
class ArtifactContents:
    """What an artifact holds, before it is written.

    Attributes:
        config: the run's resolved config, as plain data (``config_io.to_dict``).
        pipeline: the fitted features, histories covering every logged interaction.
        query_tower: the trained query tower.
        items: the raw item table; row i is item row i everywhere.
        queries: the raw query table of the known queries.
        query_key: the key column of ``queries``.
        item_key: the key column of ``items``.
        item_vectors: (N, D) float32 item vectors.
        seen: (num_queries, N) CSR of the items each known query interacted with.
        heldout: (num_queries, N) CSR of each query's test items under the split.
        recent: each known query's latest interactions (item rows), most recent first.
        index: the item index, built on ``item_vectors``.
        manifest: more manifest entries (``twotower_version``, ``index_recall``, ...).
    """

    config: dict[str, Any]
    pipeline: FeaturePipeline
    query_tower: Tower
    items: pa.Table
    queries: pa.Table
    query_key: str
    item_key: str
    item_vectors: np.ndarray
    seen: sp.csr_matrix
    heldout: sp.csr_matrix
    recent: RecentLists
    index: Index
    manifest: dict[str, Any] = dataclasses.field(default_factory=dict)


def write_artifact(folder: Path, contents: ArtifactContents) -> dict[str, Any]:
    """Writes every file of an artifact into ``folder``, the manifest last.

    Returns:
        The manifest written to ``folder/manifest.json``.
    """
    contents.pipeline.save(folder / FEATURES_DIR)
    # The query tower's state includes the item-id table a history feature shares.
    tower = {name: t.detach().cpu() for name, t in contents.query_tower.state_dict().items()}
    atomic_write(folder / QUERY_TOWER_FILE, lambda f: torch.save(tower, f))
    save_array(folder / ITEM_VECTORS_FILE, contents.item_vectors)
    for name, table in ((ITEMS_FILE, contents.items), (QUERIES_FILE, contents.queries)):
        atomic_write(folder / name, lambda f, table=table: pq.write_table(table, f))
    save_csr(folder / SEEN_FILE, contents.seen)
    save_csr(folder / HELDOUT_FILE, contents.heldout)
    save_recent(folder / RECENT_FILE, contents.recent)
    contents.index.save(folder / INDEX_DIR)
    manifest = {
        **contents.manifest,
        "format_version": FORMAT_VERSION,
        "config": contents.config,
        "embedding_dim": int(contents.item_vectors.shape[1]),
        "num_items": contents.items.num_rows,
        "num_queries": contents.queries.num_rows,
        "query_key": contents.query_key,
        "item_key": contents.item_key,
        "index": contents.index.kind,
        "files": {
            path.relative_to(folder).as_posix(): sha256_file(path)
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        },
    }
    text = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
    atomic_write(folder / MANIFEST_FILE, lambda f: f.write(text))
    return manifest


@dataclasses.dataclass(frozen=True, kw_only=True)
class Artifact:
    """A loaded, verified artifact. Read-only: safe to share between threads.

    Attributes:
        folder: where it was loaded from.
        manifest: the parsed ``manifest.json`` (``manifest["config"]``: the run's config).
        fingerprint: the first 16 hex digits of ``manifest.json``'s SHA-256; as the
            manifest lists every file's checksum, it names this exact artifact.
        model_config: the run's model config (the towers' networks).
        pipeline: the fitted features (histories: every logged interaction).
        query_tower: the query tower, on the CPU, in evaluation mode.
        items: the raw item table; row i is item row i everywhere.
        queries: the raw query table of the known queries.
        item_vectors: (N, D) float32 item vectors.
        seen: (num_queries, N) CSR of the items each known query interacted with.
        heldout: (num_queries, N) CSR of each query's test items under the run's split
            (a subset of ``seen``), or None for an artifact exported without it.
        recent: each known query's latest interactions (item rows), most recent first.
        index: the item index, built on ``item_vectors``.
        users: whether the known users' files were read; when not (a service whose
            users' state lives in an online store), ``queries`` has no row (its schema
            only), ``seen`` and ``recent`` none, ``heldout`` is None.
    """

    folder: Path
    manifest: dict[str, Any]
    fingerprint: str
    model_config: ModelConfig
    pipeline: FeaturePipeline
    query_tower: Tower
    items: pa.Table
    queries: pa.Table
    item_vectors: np.ndarray
    seen: sp.csr_matrix
    heldout: sp.csr_matrix | None
    recent: RecentLists
    index: Index
    users: bool = True

    @property
    def query_key(self) -> str:
        return self.manifest["query_key"]

    @property
    def item_key(self) -> str:
        return self.manifest["item_key"]

    @functools.cached_property
    def item_ids(self) -> pa.Array:
        """(N,) the item keys, by item row."""
        return self.items.column(self.item_key).combine_chunks()

    @functools.cached_property
    def item_id_values(self) -> np.ndarray:
        """(N,) the item keys by item row, as numpy (int64, float64 or object)."""
        return self.item_ids.to_numpy(zero_copy_only=False)

    @functools.cached_property
    def query_id_values(self) -> np.ndarray:
        """(Q,) the query keys by query row, as numpy (int64, float64 or object)."""
        return self.queries.column(self.query_key).to_numpy()

    @functools.cached_property
    def query_keys(self) -> KeyIndex:
        """Query key -> row of ``queries``, built on first use."""
        return KeyIndex(self.queries.column(self.query_key).combine_chunks())

    @functools.cached_property
    def item_keys(self) -> KeyIndex:
        """Item key -> item row, built on first use."""
        return KeyIndex(self.item_ids)

    @classmethod
    def load(cls, folder: Path, users: bool = True) -> Artifact:
        """Reads an artifact after checking its format version and every file's checksum.

        Args:
            folder: the artifact folder.
            users: read the known users' files (``USER_FILES``); False for a service
                whose users' state lives in an online store: those files are then
                neither read nor hashed, and the artifact holds no user.

        Raises:
            DataError: no manifest, a format version other than this package's, or a
                file that is missing, unlisted, corrupt or inconsistent (named).
        """
        folder = Path(folder)
        manifest = read_manifest(folder)
        fingerprint = sha256_file(folder / MANIFEST_FILE)[:16]
        verify_files(folder, manifest, skip=() if users else USER_FILES)
        pipeline = FeaturePipeline.load(folder / FEATURES_DIR)
        where = f"{folder / MANIFEST_FILE}: config.model"
        model_config = from_dict(ModelConfig, manifest["config"].get("model", {}), where=where)
        num_items = manifest["num_items"]
        num_queries = manifest["num_queries"] if users else 0
        vectors_shape = (num_items, manifest["embedding_dim"])
        # read in this order, so a manifest at odds with the files is named by its tables
        queries_path = folder / QUERIES_FILE
        return cls(
            folder=folder,
            manifest=manifest,
            fingerprint=fingerprint,
            model_config=model_config,
            pipeline=pipeline,
            items=read_parquet(folder / ITEMS_FILE, manifest["item_key"], num_items),
            queries=(
                read_parquet(queries_path, manifest["query_key"], num_queries)
                if users
                else read_schema(queries_path).empty_table()
            ),
            item_vectors=load_array(folder / ITEM_VECTORS_FILE, vectors_shape, mapped=True),
            seen=(
                load_csr(folder / SEEN_FILE, (num_queries, num_items))
                if users
                else sp.csr_matrix((0, num_items), dtype=np.float32)
            ),
            recent=load_recent(folder / RECENT_FILE, num_queries, num_items)
            if users
            else NO_RECENT,
            index=read_index(folder / INDEX_DIR, vectors_shape),
            query_tower=read_query_tower(folder / QUERY_TOWER_FILE, model_config, pipeline),
            heldout=(
                load_csr(folder / HELDOUT_FILE, (num_queries, num_items))
                if users and HELDOUT_FILE in manifest["files"]
                else None
            ),
            users=users,
        )

    @functools.cached_property
    def history_codes(self) -> dict[str, np.ndarray]:
        """The item table's codes in each query history feature's item vocabulary."""
        return self.pipeline.history_codes(self.items)

    def known_inputs(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The query tower's inputs for known query ``rows`` in their exported state."""
        return served_inputs(self.pipeline, self.queries, self.recent, self.history_codes, rows)

    def query_rows(self, ids: Sequence[Any]) -> np.ndarray:
        """(B,) int64 rows of ``queries`` holding these query keys; -1 for an unknown key.

        Ids are matched by value, not type: ``"12"`` finds the integer key 12.
        """
        return self.query_keys.rows(ids)

    def item_rows(self, ids: Sequence[Any]) -> np.ndarray:
        """(B,) int64 item rows of these item keys; -1 for an unknown key."""
        return self.item_keys.rows(ids)


def served_inputs(
    pipeline: FeaturePipeline,
    queries: pa.Table,
    recent: RecentLists,
    codes: dict[str, np.ndarray],
    rows: np.ndarray,
) -> dict[str, torch.Tensor]:
    """The query tower's inputs for known query ``rows`` as they are served: each one's
    row of ``queries`` and its ``recent`` items as its history (``codes``: the item
    table's ``FeaturePipeline.history_codes``)."""
    width = pipeline.recent_length
    return pipeline.transform("query", queries.take(rows), recent.recent(rows, width), codes)


__all__ = [  # the layout's names, for the code that writes or inspects an artifact
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MANIFEST_KEYS",
    "ONNX_FILE",
    "REQUIRED_FILES",
    "USER_FILES",
    "Artifact",
    "ArtifactContents",
    "read_manifest",
    "served_inputs",
    "verify_files",
    "write_artifact",
]
