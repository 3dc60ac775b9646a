"""The artifact format: everything retrieval needs, written here and verified file by
file when loaded. This module and ``artifact_files.py`` alone know the layout (no
pickle anywhere):

    manifest.json        format version, package version, creation time, resolved config,
                         the run's metrics, sizes, index kind, the artifact's ``version``
                         and its ``updates``, and {file: sha256} of every other file
    features/            the fitted feature state; histories cover every logged interaction
    query_tower.pt       the query tower's state_dict (tensors only)
    item_tower.pt        the item tower's state_dict (tensors only): the artifact embeds
                         item rows by itself (``twotower.serving.updates``)
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
    updates/000002/      optional, one folder per version after the export's (version 1):
                         items.parquet (the raw rows it adds or replaces, the item table's
                         schema), item_vectors.npy (their vectors), change.json (the ids
                         it blocks, unblocks and removes)

An export writes version 1. Each update writes the next version's folder, then the
manifest, which lists every file of every version (the export's are never rewritten):
a version exists once the manifest names it, so whenever a writer is killed the folder
holds one whole version. ``Artifact.load`` reads the export, then applies each update in
order (``twotower.serving.catalogue``).

``write_artifact`` writes a folder (``twotower.export`` fills it from a run and swaps
it into place); ``Artifact.load`` reads one back, each file through its reader in
``artifact_files.py`` (which also names the files).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
import torch

from twotower.config_io import from_dict
from twotower.errors import DataError
from twotower.features.history import RecentLists
from twotower.features.pipeline import FeaturePipeline
from twotower.index import Index
from twotower.serving.artifact_files import (
    FEATURES_DIR,
    FORMAT_VERSION,
    HELDOUT_FILE,
    INDEX_DIR,
    ITEM_TOWER_FILE,
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
    fingerprint_of,
    load_recent,
    manifest_and_fingerprint,
    read_index,
    read_item_tower,
    read_manifest,
    read_parquet,
    read_query_tower,
    read_schema,
    read_update,
    save_recent,
    verify_files,
    write_manifest,
)
from twotower.serving.catalogue import Catalogue, ItemUpdate
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
        item_tower: the trained item tower (saved so the artifact embeds new item rows).
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
    item_tower: Tower
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
    for name, tower in (
        (QUERY_TOWER_FILE, contents.query_tower),
        (ITEM_TOWER_FILE, contents.item_tower),
    ):
        state = {key: t.detach().cpu() for key, t in tower.state_dict().items()}
        atomic_write(folder / name, lambda f, state=state: torch.save(state, f))
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
        "version": 1,  # each update adds one (twotower.serving.updates)
        "updates": [],
        "files": {
            path.relative_to(folder).as_posix(): sha256_file(path)
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        },
    }
    write_manifest(folder, manifest)
    return manifest


@dataclasses.dataclass(frozen=True, kw_only=True)
class Artifact:
    """A loaded, verified artifact, at one version. Read-only: safe to share between
    threads; ``updated`` gives the next version as another ``Artifact``.

    Attributes:
        folder: where it was loaded from.
        manifest: the parsed ``manifest.json`` (``manifest["config"]``: the run's config).
        fingerprint: the first 16 hex digits of ``manifest.json``'s SHA-256; as the
            manifest lists every file's checksum, it names this exact artifact version.
        model_config: the run's model config (the towers' networks).
        pipeline: the fitted features (histories: every logged interaction).
        query_tower: the query tower, on the CPU, in evaluation mode.
        catalogue: the items served at this version: their raw rows, vectors, index,
            and which are blocked or removed (``twotower.serving.catalogue``).
        queries: the raw query table of the known queries.
        seen: (num_queries, N) CSR of the items each known query interacted with.
        heldout: (num_queries, N) CSR of each query's test items under the run's split
            (a subset of ``seen``), or None for an artifact exported without it.
        recent: each known query's latest interactions (item rows), most recent first.
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
    catalogue: Catalogue
    queries: pa.Table
    seen: sp.csr_matrix
    heldout: sp.csr_matrix | None
    recent: RecentLists
    users: bool = True

    @property
    def query_key(self) -> str:
        return self.manifest["query_key"]

    @property
    def item_key(self) -> str:
        return self.manifest["item_key"]

    @property
    def version(self) -> int:
        """This version's number: 1 for an export, one more for each update since."""
        return self.manifest["version"]

    @property
    def base_fingerprint(self) -> str:
        """The fingerprint of version 1, which every later version keeps: updates change
        only the items, so whatever belongs to the users and the query tower (their
        precomputed vectors, their loaded states) stays valid across versions."""
        return self.manifest.get("base_fingerprint", self.fingerprint)

    @property
    def items(self) -> pa.Table:
        """The raw item table; row i is item row i everywhere (removed rows included)."""
        return self.catalogue.items

    @property
    def item_vectors(self) -> np.ndarray:
        """(N, D) float32 each item row's current vector."""
        return self.catalogue.item_vectors

    @property
    def index(self) -> Index:
        """The item index (over the catalogue's slots: search through ``catalogue``)."""
        return self.catalogue.index

    @property
    def item_ids(self) -> pa.Array:
        """(N,) the item keys, by item row."""
        return self.catalogue.item_ids

    @property
    def item_id_values(self) -> np.ndarray:
        """(N,) the item keys by item row, as numpy (int64, float64 or object)."""
        return self.catalogue.item_id_values

    @functools.cached_property
    def query_id_values(self) -> np.ndarray:
        """(Q,) the query keys by query row, as numpy (int64, float64 or object)."""
        return self.queries.column(self.query_key).to_numpy()

    @functools.cached_property
    def query_keys(self) -> KeyIndex:
        """Query key -> row of ``queries``, built on first use."""
        return KeyIndex(self.queries.column(self.query_key).combine_chunks())

    @functools.cached_property
    def item_tower(self) -> Tower:
        """The item tower, on the CPU, in evaluation mode; read on first use (a service
        that never changes its items never builds it), its checksum verified again
        then: the folder may hold another export by now.

        Raises:
            DataError: its file is no longer the one this artifact was loaded with.
        """
        path = self.folder / ITEM_TOWER_FILE
        if not path.is_file() or sha256_file(path) != self.manifest["files"][ITEM_TOWER_FILE]:
            raise DataError(
                f"{path}: no longer the item tower of artifact {self.fingerprint} (the "
                "folder was exported again since it was loaded); reload it first"
            )
        return read_item_tower(path, self.model_config, self.pipeline)

    @classmethod
    def load(cls, folder: Path, users: bool = True, index: bool = True) -> Artifact:
        """Reads an artifact after checking its format version and every file's checksum:
        the export, then each update in order (its latest version).

        Args:
            folder: the artifact folder.
            users: read the known users' files (``USER_FILES``); False for a service
                whose users' state lives in an online store: those files are then
                neither read nor hashed, and the artifact holds no user.
            index: read the item index; False for a job that only changes the items
                (``twotower export --update``): the catalogue then holds no index and
                cannot search.

        Raises:
            DataError: no manifest, a format version other than this package's, or a
                file that is missing, unlisted, corrupt or inconsistent (named).
        """
        folder = Path(folder)
        manifest, fingerprint = manifest_and_fingerprint(folder)
        verify_files(folder, manifest, skip=() if users else USER_FILES)
        pipeline = FeaturePipeline.load(folder / FEATURES_DIR)
        where = f"{folder / MANIFEST_FILE}: config.model"
        model_config = from_dict(ModelConfig, manifest["config"].get("model", {}), where=where)
        num_items = manifest["num_items"]
        num_queries = manifest["num_queries"] if users else 0
        queries_path = folder / QUERIES_FILE
        # read in this order, so a manifest at odds with the files is named by its tables
        catalogue = _read_catalogue(folder, manifest, index)
        return cls(
            folder=folder,
            manifest=manifest,
            fingerprint=fingerprint,
            model_config=model_config,
            pipeline=pipeline,
            catalogue=catalogue,
            queries=(
                read_parquet(queries_path, manifest["query_key"], num_queries)
                if users
                else read_schema(queries_path).empty_table()
            ),
            seen=(
                load_csr(folder / SEEN_FILE, (num_queries, num_items))
                if users
                else sp.csr_matrix((0, num_items), dtype=np.float32)
            ),
            recent=load_recent(folder / RECENT_FILE, num_queries, num_items)
            if users
            else NO_RECENT,
            query_tower=read_query_tower(folder / QUERY_TOWER_FILE, model_config, pipeline),
            heldout=(
                load_csr(folder / HELDOUT_FILE, (num_queries, num_items))
                if users and HELDOUT_FILE in manifest["files"]
                else None
            ),
            users=users,
        )

    def updated(self, update: ItemUpdate, manifest: dict[str, Any]) -> Artifact:
        """The next version, in memory: this artifact with ``update`` applied to its
        catalogue (``Catalogue.apply``: the index grows in place) and ``manifest``, the
        one ``twotower.serving.updates.write_update`` wrote for it. Users, towers and
        features are this one's (shared, not copied), as is what was built from them.

        Raises:
            DataError: ``manifest`` is not the version after this one.
        """
        if manifest.get("version") != self.version + 1:
            raise DataError(
                f"{self.folder}: version {manifest.get('version')!r} does not follow "
                f"version {self.version}"
            )
        catalogue = self.catalogue.apply(update, f"version {update.version}")
        fingerprint = fingerprint_of(manifest)
        new = dataclasses.replace(
            self, manifest=manifest, fingerprint=fingerprint, catalogue=catalogue
        )
        for name in ("query_id_values", "query_keys", "item_tower"):  # the users' and towers'
            if name in self.__dict__:
                new.__dict__[name] = self.__dict__[name]
        return new

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
        """(B,) int64 item rows of these item keys; -1 for a key the catalogue does not
        know (never held, or removed; a blocked item is known)."""
        return self.catalogue.rows(ids)


def _read_catalogue(folder: Path, manifest: dict[str, Any], index: bool) -> Catalogue:
    """The catalogue of the manifest's version: the export's items, vectors and index,
    then each update applied in order.

    A FAISS index that updates will grow is read into memory, not mapped (FAISS cannot
    grow a mapped one); without an update it is mapped as always.
    """
    num_items, key = manifest["num_items"], manifest["item_key"]
    shape = (num_items, manifest["embedding_dim"])
    items = read_parquet(folder / ITEMS_FILE, key, num_items)
    vectors = load_array(folder / ITEM_VECTORS_FILE, shape, mapped=True)
    grows = any(entry.get("added", 0) or entry.get("replaced", 0) for entry in manifest["updates"])
    built = read_index(folder / INDEX_DIR, shape, mapped=not grows) if index else None
    catalogue = Catalogue.exported(items, vectors, built, key)
    for entry in manifest["updates"]:
        update = read_update(folder, entry, items.schema, shape[1])
        catalogue = catalogue.apply(update, str(folder / entry["folder"]))
    return catalogue


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
