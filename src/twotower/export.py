"""A trained run -> a self-contained serving artifact, swapped into place atomically.

The artifact (its format is ``twotower.serving.artifact``'s) holds everything
retrieval needs and nothing of training: the fitted features with every logged
interaction in the histories, the query tower's weights, the item vectors and their
index, the raw item and query tables, and the items each known query has already seen.

It is built in a staging folder beside ``out`` and swapped into place in one atomic
step (``twotower.storage.replaced_folder``), so ``out`` is always a whole artifact:
the previous one until the swap, the new one after it, whenever the process is
killed; exports to one folder are serialized by a lock.
"""

from __future__ import annotations

import datetime
import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from twotower.config_io import to_dict
from twotower.data.dataset import Dataset
from twotower.data.matrix import interaction_matrix
from twotower.errors import ConfigError, DataError
from twotower.features.pipeline import FeaturePipeline
from twotower.index import INDEXES, Index, build_index, choose_index, recall_against_exact
from twotower.prepare import load_data
from twotower.serving.artifact import MANIFEST_FILE, ArtifactContents, write_artifact
from twotower.storage import replaced_folder
from twotower.threads import set_threads
from twotower.towers.model import Tower, embed_rows
from twotower.training.checkpoint import CheckpointStore
from twotower.training.run import METRICS_FILE, load_model

# How the index is checked against exact search at export time.
RECALL_QUERIES = 1000
RECALL_K = 10


def export_run(
    run_dir: Path, out: Path, index: str = "exact", threads: int | None = None
) -> dict[str, Any]:
    """Exports a run's best checkpoint as the artifact folder ``out``.

    The run's data is read again from the config in its checkpoint, so the files
    it was trained on must still be there.

    Args:
        run_dir: a run folder (``twotower train --out``) with a best checkpoint.
        out: the artifact folder; an existing artifact there is replaced.
        index: the item index kind, a key of ``twotower.index.INDEXES``, or ``auto``
            to choose by corpus size (``twotower.index.choose_index``).
        threads: CPU threads; default the run's ``threads``.

    Returns:
        The manifest written to ``out/manifest.json``.

    Raises:
        ConfigError: an unknown index kind.
        DataError: no best checkpoint in ``run_dir``, or ``out`` exists and is not an
            artifact (it is never replaced then).
    """
    run_dir = Path(run_dir)
    if index not in (*INDEXES, "auto"):
        raise ConfigError(f"unknown index {index!r}; choose auto or one of {', '.join(INDEXES)}")
    if not CheckpointStore(run_dir / "checkpoints").exists("best"):
        raise DataError(
            f"{run_dir}: no best checkpoint (checkpoints/best.json); train the run first"
        )
    with replaced_folder(out, MANIFEST_FILE, "an exported artifact") as staging:
        contents = artifact_contents(run_dir, index, threads)
        return write_artifact(staging, contents)


def artifact_contents(run_dir: Path, index: str, threads: int | None = None) -> ArtifactContents:
    """Everything the artifact of a run's best model holds, computed in memory."""
    config, pipeline, model = load_model(run_dir)
    set_threads(threads or config.threads)
    dataset, split = load_data(config)
    served = pipeline.with_histories(dataset, dataset.interactions)
    vectors = embed_rows(model.item_tower, served, "item", dataset.items).cpu().numpy()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, D)
    seen = interaction_matrix(dataset.interactions, dataset.num_queries, dataset.num_items)
    built = build_index(choose_index(index, len(vectors)), vectors)
    recall = _index_recall(built, vectors, model.query_tower, served, dataset, seen)
    return ArtifactContents(
        config=to_dict(config),
        pipeline=served,
        query_tower=model.query_tower,
        items=dataset.items,
        queries=dataset.queries,
        query_key=dataset.query_key,
        item_key=dataset.item_key,
        item_vectors=vectors,
        seen=seen,
        heldout=interaction_matrix(split.test, dataset.num_queries, dataset.num_items),
        index=built,
        manifest={
            "twotower_version": version("twotower"),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "index_recall": recall,
            "metrics": _read_metrics(run_dir),
        },
    )


def _index_recall(
    index: Index,
    vectors: np.ndarray,
    query_tower: Tower,
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
    queries = embed_rows(query_tower, pipeline, "query", dataset.queries.take(rows))
    queries = np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32)
    recall = recall_against_exact(index, vectors, queries, RECALL_K, seen[rows])
    return {"k": RECALL_K, "queries": count, "recall": recall, "exact": index.is_exact}


def _read_metrics(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / METRICS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
