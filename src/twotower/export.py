"""A trained run -> a self-contained serving artifact, written atomically.

The artifact (layout in ``twotower.serving.artifact``) holds everything retrieval
needs and nothing of training: the fitted features with every logged interaction
in the histories, the query tower's weights, the item vectors and their index, the
raw item and query tables, and the items each known query has already seen.

It is built in a temporary folder beside ``out`` and swapped into place in one
atomic step (``renameat2(RENAME_EXCHANGE)`` on Linux), so ``out`` is always a whole
artifact: the previous one until the swap, the new one after it, whenever the
process is killed. Where the file system cannot swap, the previous artifact is
renamed aside to ``.<out>.<random>.old`` first; a process killed between the two
renames leaves it there, and the next export puts it back. Exports to one folder
hold a lock (``.<out>.lock`` beside it), so the next one also removes whatever a
killed one left half-built.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
import torch

from twotower.config import Config, to_dict
from twotower.data.dataset import Dataset
from twotower.data.matrix import interaction_matrix
from twotower.data.splits import Split
from twotower.errors import ConfigError, DataError
from twotower.features.pipeline import FeaturePipeline
from twotower.index import INDEXES, Index, build_index, choose_index, recall_against_exact
from twotower.serving.artifact import (
    FEATURES_DIR,
    FORMAT_VERSION,
    HELDOUT_FILE,
    INDEX_DIR,
    ITEM_VECTORS_FILE,
    ITEMS_FILE,
    MANIFEST_FILE,
    QUERIES_FILE,
    QUERY_TOWER_FILE,
    SEEN_FILE,
)
from twotower.storage import atomic_write, exchange_paths, sha256_file
from twotower.towers.model import TwoTower, embed_rows
from twotower.training.checkpoint import CheckpointStore
from twotower.training.run import METRICS_FILE, load_data, load_model

log = logging.getLogger(__name__)


def export_run(run_dir: Path, out: Path, index: str = "exact") -> dict[str, Any]:
    """Exports a run's best checkpoint as the artifact folder ``out``.

    The run's data is read again from the config in its checkpoint, so the files
    it was trained on must still be there.

    Args:
        run_dir: a run folder (``twotower train --out``) with a best checkpoint.
        out: the artifact folder; an existing artifact there is replaced.
        index: the item index kind, a key of ``twotower.index.INDEXES``, or ``auto``
            to choose by corpus size (``twotower.index.choose_index``).

    Returns:
        The manifest written to ``out/manifest.json``.

    Raises:
        ConfigError: an unknown index kind.
        DataError: no best checkpoint in ``run_dir``, or ``out`` exists and is not an
            artifact (it is never replaced then).
    """
    run_dir, out = Path(run_dir), Path(os.path.abspath(out))
    if index not in (*INDEXES, "auto"):
        raise ConfigError(f"unknown index {index!r}; choose auto or one of {', '.join(INDEXES)}")
    if not CheckpointStore(run_dir / "checkpoints").exists("best"):
        raise DataError(
            f"{run_dir}: no best checkpoint (checkpoints/best.json); train the run first"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with _export_lock(out) as locked:
        _recover(out, remove_leftovers=locked)
        _check_replaceable(out)
        config, pipeline, model = load_model(run_dir)
        dataset, split = load_data(config)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        try:
            manifest = _write_artifact(staging, config, pipeline, model, dataset, split, index)
            manifest["metrics"] = _read_metrics(run_dir)
            text = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
            atomic_write(staging / MANIFEST_FILE, lambda f: f.write(text))
            _swap_in(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return manifest


@contextlib.contextmanager
def _export_lock(out: Path):
    """Holds ``.<out>.lock`` (beside ``out``) exclusively: another export to ``out`` waits.
    Yields whether it could (not where the system has no ``fcntl``)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(out.parent / f".{out.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _recover(out: Path, remove_leftovers: bool) -> None:
    """Puts back a previous artifact that a killed export left renamed aside; with the
    export lock held, also removes the folders that killed exports left behind."""
    aside = sorted(
        out.parent.glob(f".{out.name}.*.old"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    if aside and not out.exists() and (aside[0] / MANIFEST_FILE).is_file():
        os.rename(aside[0], out)
        log.warning("%s: put back the previous artifact, left aside by a killed export", out)
        aside = aside[1:]
    if not remove_leftovers:
        return
    for leftover in [*aside, *out.parent.glob(f".{out.name}.*.tmp")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
            log.info("removed %s, left by an export that was killed", leftover)


def _write_artifact(
    folder: Path,
    config: Config,
    pipeline: FeaturePipeline,
    model: TwoTower,
    dataset: Dataset,
    split: Split,
    index: str,
) -> dict[str, Any]:
    """Writes every file but the manifest into ``folder``; returns the manifest."""
    served = pipeline.with_histories(dataset, dataset.interactions)
    served.save(folder / FEATURES_DIR)
    # The query tower's state includes the item-id table a history feature shares.
    tower_state = {name: t.detach().cpu() for name, t in model.query_tower.state_dict().items()}
    atomic_write(folder / QUERY_TOWER_FILE, lambda f: torch.save(tower_state, f))
    vectors = embed_rows(model.item_tower, served, "item", dataset.items).cpu().numpy()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, D)
    atomic_write(folder / ITEM_VECTORS_FILE, lambda f: np.save(f, vectors, allow_pickle=False))
    _write_parquet(folder / ITEMS_FILE, dataset.items)
    _write_parquet(folder / QUERIES_FILE, dataset.queries)
    seen = interaction_matrix(dataset.interactions, dataset.num_queries, dataset.num_items)
    _write_sparse(folder / SEEN_FILE, seen)
    heldout = interaction_matrix(split.test, dataset.num_queries, dataset.num_items)
    _write_sparse(folder / HELDOUT_FILE, heldout)
    index = choose_index(index, len(vectors))
    built = build_index(index, vectors)
    built.save(folder / INDEX_DIR)
    return {
        "format_version": FORMAT_VERSION,
        "twotower_version": version("twotower"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": to_dict(config),
        "embedding_dim": int(vectors.shape[1]),
        "num_items": dataset.num_items,
        "num_queries": dataset.num_queries,
        "query_key": dataset.query_key,
        "item_key": dataset.item_key,
        "index": index,
        "index_recall": _index_recall(built, vectors, model, served, dataset, seen),
        "files": {
            path.relative_to(folder).as_posix(): sha256_file(path)
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        },
    }


# How the index is checked against exact search at export time.
RECALL_QUERIES = 1000
RECALL_K = 10


def _index_recall(
    index: Index,
    vectors: np.ndarray,
    model: TwoTower,
    pipeline: FeaturePipeline,
    dataset: Dataset,
    seen: sp.csr_matrix,
) -> dict[str, Any]:
    """Recall@10 of the index against exact search, for a sample of known queries.

    The queries are searched as the service will search them: with every logged
    interaction in their history and their seen items excluded.
    """
    rng = np.random.default_rng(0)
    count = min(RECALL_QUERIES, dataset.num_queries)
    rows = np.sort(rng.choice(dataset.num_queries, size=count, replace=False))
    queries = embed_rows(model.query_tower, pipeline, "query", dataset.queries.take(rows))
    queries = np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32)
    recall = recall_against_exact(index, vectors, queries, RECALL_K, seen[rows])
    return {"k": RECALL_K, "queries": count, "recall": recall, "exact": index.is_exact}


def _write_sparse(path: Path, matrix: sp.csr_matrix) -> None:
    """A 0/1 CSR matrix as its index arrays (no pickle)."""
    shape = np.array(matrix.shape, np.int64)
    atomic_write(
        path, lambda f: np.savez(f, indptr=matrix.indptr, indices=matrix.indices, shape=shape)
    )


def _write_parquet(path: Path, table: pa.Table) -> None:
    atomic_write(path, lambda f: pq.write_table(table, f))


def _read_metrics(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / METRICS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _check_replaceable(out: Path) -> None:
    """Refuses to put an artifact where something other than an artifact lies."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; refusing to replace it")
    if not (out / MANIFEST_FILE).is_file() and any(out.iterdir()):
        raise DataError(
            f"{out}: exists and is not an exported artifact (no {MANIFEST_FILE}); "
            "refusing to replace it"
        )


def _swap_in(staging: Path, out: Path) -> None:
    """Puts ``staging`` at ``out``; a previous ``out`` is swapped out, then removed."""
    if not out.exists():
        os.rename(staging, out)
        return
    if exchange_paths(staging, out):
        shutil.rmtree(staging, ignore_errors=True)  # now the previous artifact
        return
    aside = staging.with_suffix(".old")  # unique, as the random part of staging's name is
    os.rename(out, aside)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)
