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

import dataclasses
import datetime
import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
import torch

from twotower.config import Config
from twotower.config_io import to_dict
from twotower.data.build.format import QUERY_COLUMNS, SEEN, TARGETS, built_stream
from twotower.data.matrix import interaction_matrix
from twotower.errors import ConfigError, DataError
from twotower.features.contract import input_contract
from twotower.features.pipeline import FeaturePipeline
from twotower.features.streaming import ItemKeys, item_matrix, read_items
from twotower.index import INDEXES, Index, build_index, choose_index, recall_against_exact
from twotower.prepare import load_data
from twotower.serving.artifact import MANIFEST_FILE, ONNX_FILE, ArtifactContents, write_artifact
from twotower.serving.runtime import OnnxRuntime
from twotower.storage import replaced_folder
from twotower.threads import set_threads
from twotower.towers.model import Tower, TwoTower, embed_inputs, embed_rows
from twotower.towers.portable import OUTPUT, save_onnx
from twotower.training.checkpoint import CheckpointStore
from twotower.training.run import METRICS_FILE, load_model

# How the index is checked against exact search at export time.
RECALL_QUERIES = 1000
RECALL_K = 10
# How an ONNX query tower is checked against PyTorch at export time.
ONNX_CHECK_QUERIES = 1000
ONNX_TOLERANCE = 1e-5


AS_OF = ("valid", "test", "all")  # whose interactions an artifact's users know


def export_run(
    run_dir: Path,
    out: Path,
    index: str = "exact",
    threads: int | None = None,
    as_of: str = "all",
    onnx: bool = False,
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
        as_of: the users' histories and seen items as of the end of validation
            (``valid``: the state the test metrics are computed in, so the artifact's
            answers are the evaluated rankings), of test (``test``: train, validation
            and test), or of every logged interaction (``all``, what a live service
            serves; the same as ``test`` where the split places every interaction).
        onnx: also write the query tower as an ONNX graph (``onnx/query_tower.onnx``),
            checked against PyTorch on up to ``ONNX_CHECK_QUERIES`` known queries; the
            manifest's ``onnx`` entry holds its input contract and the check.

    Returns:
        The manifest written to ``out/manifest.json`` (``as_of`` among its entries).

    Raises:
        ConfigError: an unknown index kind or ``as_of``.
        DataError: no best checkpoint in ``run_dir``, or ``out`` exists and is not an
            artifact (it is never replaced then).
    """
    run_dir = Path(run_dir)
    if index not in (*INDEXES, "auto"):
        raise ConfigError(f"unknown index {index!r}; choose auto or one of {', '.join(INDEXES)}")
    if as_of not in AS_OF:
        raise ConfigError(f"unknown as-of {as_of!r}; choose one of {', '.join(AS_OF)}")
    if not CheckpointStore(run_dir / "checkpoints").exists("best"):
        raise DataError(
            f"{run_dir}: no best checkpoint (checkpoints/best.json); train the run first"
        )
    with replaced_folder(out, MANIFEST_FILE, "an exported artifact") as staging:
        contents = artifact_contents(run_dir, index, threads, as_of)
        if onnx:
            entry = write_onnx(contents.query_tower, contents.pipeline, contents.queries, staging)
            contents = dataclasses.replace(contents, manifest={**contents.manifest, "onnx": entry})
        return write_artifact(staging, contents)


def artifact_contents(
    run_dir: Path, index: str, threads: int | None = None, as_of: str = "all"
) -> ArtifactContents:
    """Everything the artifact of a run's best model holds, computed in memory."""
    config, pipeline, model = load_model(run_dir)
    set_threads(threads or config.threads)
    if config.data.source == "stream":
        return _built_contents(config, pipeline, model, index, run_dir, as_of)
    dataset, split = load_data(config)
    if as_of == "valid":
        known = pa.concat_tables([split.train, split.valid])
    elif as_of == "test":
        known = pa.concat_tables([split.train, split.valid, split.test])
    else:
        known = dataset.interactions
    served = pipeline.with_histories(dataset, known)
    vectors = embed_rows(model.item_tower, served, "item", dataset.items).cpu().numpy()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, D)
    seen = interaction_matrix(known, dataset.num_queries, dataset.num_items)
    built = build_index(choose_index(index, len(vectors)), vectors)
    recall = _index_recall(built, vectors, model.query_tower, served, dataset.queries, seen)
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
        manifest=_manifest(recall, run_dir, as_of),
    )


def write_onnx(
    tower: Tower, pipeline: FeaturePipeline, queries: pa.Table, folder: Path
) -> dict[str, Any]:
    """Writes the query tower as ONNX into the artifact folder ``folder`` and checks it.

    The graph runs on ONNX Runtime for up to ``ONNX_CHECK_QUERIES`` known queries (a
    fixed sample, with their histories), against PyTorch on the same inputs.

    Returns:
        The manifest's ``onnx`` entry: the file, the input contract
        (``twotower.features.contract``), the output's shape and the check.

    Raises:
        RuntimeError: the graph's vectors differ from PyTorch's by more than
            ``ONNX_TOLERANCE`` (an exporter fault; nothing is written then).
    """
    contract = input_contract(pipeline, "query")
    shapes = {spec["name"]: spec["shape"] for spec in contract}
    example = _example_inputs(pipeline.transform("query", queries.slice(0, 64)), shapes)
    save_onnx(tower, example, shapes, folder / ONNX_FILE)
    rng = np.random.default_rng(0)
    count = min(ONNX_CHECK_QUERIES, queries.num_rows)
    rows = np.sort(rng.choice(queries.num_rows, size=count, replace=False))
    inputs = pipeline.transform("query", queries.take(rows))
    names = [spec["name"] for spec in contract]
    shape = (tower.interests, tower.output_dim)
    expected = embed_inputs(tower, [inputs]).cpu().numpy()
    got = OnnxRuntime(folder / ONNX_FILE, names, shape).vectors([inputs])
    error = float(np.abs(got - expected).max()) if count else 0.0
    if not error <= ONNX_TOLERANCE:
        raise RuntimeError(
            f"the ONNX query tower differs from PyTorch's by {error:.3g} on {count} known "
            f"queries (more than {ONNX_TOLERANCE:g}); the artifact was not written"
        )
    output = ["batch", tower.output_dim]
    if tower.interests > 1:
        output.insert(1, tower.interests)
    return {
        "file": ONNX_FILE,
        "inputs": contract,
        "output": {"name": OUTPUT, "dtype": "float32", "shape": output},
        "check": {"queries": count, "max_abs_diff": error, "tolerance": ONNX_TOLERANCE},
    }


def _example_inputs(
    inputs: dict[str, torch.Tensor], shapes: dict[str, list[int | str]]
) -> dict[str, torch.Tensor]:
    """A batch to capture the graph from: every axis that varies made at least 2 long
    (the capture would fix an axis of size 0 or 1), zero-padded (0 is padding)."""
    out = {}
    for name, values in inputs.items():
        if values.shape[0] < 2:
            values = torch.cat([values, torch.zeros_like(values[:1]).expand(2, *values.shape[1:])])
        pad = [0, 0] * values.dim()
        for axis, size in enumerate(shapes[name]):
            if isinstance(size, str) and axis > 0 and values.shape[axis] < 2:
                pad[2 * (values.dim() - 1 - axis) + 1] = 2 - values.shape[axis]
        out[name] = torch.nn.functional.pad(values, pad)
    return out


def _built_contents(
    config: Config,
    pipeline: FeaturePipeline,
    model: TwoTower,
    index: str,
    run_dir: Path,
    as_of: str,
) -> ArtifactContents:
    """The artifact of a run trained on a data build: its known queries are the build's
    rows as of ``as_of`` (``queries_test.parquet``, the state before test, for
    ``valid``; ``queries_all.parquet`` otherwise: features, histories and seen items),
    its held-out items those of ``queries_test.parquet``."""
    folder = config.data.stream.built
    if folder is None:
        raise ConfigError(
            "exporting a streamed run reads each query's features and history from a data "
            "build: build the data (twotower data build) and train on data.stream.built"
        )
    stream = built_stream(config.data.stream)
    items = read_items(stream, pipeline.config)
    keys = ItemKeys(items.column(stream.item_id).combine_chunks(), str(stream.items))
    num_items = items.num_rows
    path = folder / f"queries_{'test' if as_of == 'valid' else 'all'}.parquet"
    state = pq.read_table(path)
    seen = item_matrix(state.column(SEEN), keys, num_items, path)
    queries = state.drop_columns(list(QUERY_COLUMNS))
    test = pq.read_table(folder / "queries_test.parquet", columns=[stream.query_id, TARGETS])
    if not test.column(stream.query_id).equals(state.column(stream.query_id)):
        raise DataError(f"{folder}: queries_test.parquet and {path.name} disagree")
    heldout = item_matrix(test.column(TARGETS), keys, num_items, folder / "queries_test.parquet")
    vectors = embed_rows(model.item_tower, pipeline, "item", items).cpu().numpy()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, D)
    built = build_index(choose_index(index, len(vectors)), vectors)
    recall = _index_recall(built, vectors, model.query_tower, pipeline, queries, seen)
    return ArtifactContents(
        config=to_dict(config),
        pipeline=pipeline,
        query_tower=model.query_tower,
        items=items,
        queries=queries,
        query_key=stream.query_id,
        item_key=stream.item_id,
        item_vectors=vectors,
        seen=seen,
        heldout=heldout,
        index=built,
        manifest=_manifest(recall, run_dir, as_of),
    )


def _manifest(recall: dict[str, Any], run_dir: Path, as_of: str) -> dict[str, Any]:
    return {
        "as_of": as_of,
        "twotower_version": version("twotower"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "index_recall": recall,
        "metrics": _read_metrics(run_dir),
    }


def _index_recall(
    index: Index,
    vectors: np.ndarray,
    query_tower: Tower,
    pipeline: FeaturePipeline,
    queries: pa.Table,
    seen: sp.csr_matrix,
) -> dict[str, Any]:
    """Recall@10 of the index against exact search, for a sample of known queries.

    The queries are searched as the service will search them: with every logged
    interaction in their history and their seen items excluded.
    """
    rng = np.random.default_rng(0)
    count = min(RECALL_QUERIES, queries.num_rows)
    rows = np.sort(rng.choice(queries.num_rows, size=count, replace=False))
    vectors_q = embed_rows(query_tower, pipeline, "query", queries.take(rows))
    vectors_q = np.ascontiguousarray(vectors_q.cpu().numpy(), dtype=np.float32)
    recall = recall_against_exact(index, vectors, vectors_q, RECALL_K, seen[rows])
    return {"k": RECALL_K, "queries": count, "recall": recall, "exact": index.is_exact}


def _read_metrics(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / METRICS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
