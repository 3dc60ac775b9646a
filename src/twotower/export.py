"""A trained run -> a self-contained serving artifact, swapped into place atomically.

The artifact (its format is ``twotower.serving.artifact``'s) holds everything
retrieval needs and nothing of training: the fitted features with every logged
interaction in the histories, the query tower's weights, the item vectors and their
index, the raw item and query tables, and the items each known query has already seen.

It is built in a staging folder beside ``out`` and swapped into place in one atomic
step (``twotower.storage.replaced_folder``), so ``out`` is always a whole artifact:
the previous one until the swap, the new one after it, whenever the process is
killed; exports to one folder are serialized by a lock.

An export is version 1 of its artifact. ``update_artifact`` (``twotower export
--update``) writes the next version in place from files of changed item rows and of
ids to block, unblock or remove (``twotower.serving.updates``), in time that follows
the change, not the corpus; a full export again starts over at version 1 with every
item embedded and the index built anew (compacting what the updates appended).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from twotower.config_io import to_dict
from twotower.data.config import TableSpec
from twotower.data.tables import position, read_table
from twotower.errors import ConfigError, DataError
from twotower.features.contract import input_contract
from twotower.features.history import RecentLists
from twotower.features.pipeline import FeaturePipeline
from twotower.index import INDEXES, Index, build_index, choose_index, recall_against_exact
from twotower.serving.artifact import (
    MANIFEST_FILE,
    ONNX_FILE,
    Artifact,
    ArtifactContents,
    served_inputs,
    write_artifact,
)
from twotower.serving.query_vectors import write_query_vectors
from twotower.serving.runtime import OnnxRuntime
from twotower.serving.updates import ItemChange, prepare_update, write_update
from twotower.sources import KnownQueries, check_as_of, open_source
from twotower.storage import replaced_folder
from twotower.threads import set_threads
from twotower.towers.model import Tower, embed_inputs, embed_rows
from twotower.towers.onnx import OUTPUT, save_onnx
from twotower.training.checkpoint import CheckpointStore
from twotower.training.run import METRICS_FILE, load_model, reported_model

# How the index is checked against exact search at export time.
RECALL_QUERIES = 1000
RECALL_K = 10
# How an ONNX query tower is checked against PyTorch at export time.
ONNX_CHECK_QUERIES = 1000
ONNX_TOLERANCE = 1e-5


def export_run(
    run_dir: Path,
    out: Path,
    index: str = "exact",
    threads: int | None = None,
    as_of: str = "all",
    onnx: bool = False,
    query_vectors: Path | None = None,
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
    check_as_of(as_of)
    if not CheckpointStore(run_dir / "checkpoints").exists("best"):
        raise DataError(
            f"{run_dir}: no best checkpoint (checkpoints/best.json); train the run first"
        )
    with replaced_folder(out, MANIFEST_FILE, "an exported artifact") as staging:
        contents = artifact_contents(run_dir, index, threads, as_of)
        if onnx:
            entry = write_onnx(
                contents.query_tower,
                contents.pipeline,
                contents.queries,
                staging,
                served=(contents.recent, contents.items),
            )
            contents = dataclasses.replace(contents, manifest={**contents.manifest, "onnx": entry})
        manifest = write_artifact(staging, contents)
    if query_vectors is not None:
        write_query_vectors(Artifact.load(out), query_vectors)
    return manifest


def update_artifact(
    folder: Path,
    items: Path | None = None,
    block: Path | None = None,
    unblock: Path | None = None,
    remove: Path | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Writes the next version of the artifact ``folder`` from files of changes.

    Only rows that are new or differ from their item's current row are embedded (by
    the artifact's own item tower) and written; the artifact's earlier files are
    never rewritten. The version appears whole or not at all
    (``twotower.serving.updates.write_update``); a change that changes nothing writes
    no version.

    Args:
        folder: an exported artifact.
        items: a CSV (comma-separated, with a header) or Parquet file of raw item rows
            to add or replace: the item key and every column the item features read,
            any other column of the item table optional (``read_item_rows``).
        block, unblock, remove: files of item ids (``read_ids``).
        threads: CPU threads for embedding; default the CPUs available.

    Returns:
        ``version`` (the artifact's version now), ``written`` (whether this call wrote
        it), and how many items it ``added``, ``replaced``, ``blocked``, ``unblocked``
        and ``removed``, and how many given rows were ``unchanged``.

    Raises:
        DataError: ``folder`` holds no artifact, or a file or a change is refused (named).
    """
    folder = Path(folder)
    set_threads(threads)
    artifact = Artifact.load(folder, users=False, index=False)  # only the items change
    key = artifact.item_key
    rows: dict[str, Any] = {}
    if items is not None:
        spec = TableSpec(Path(items))
        rows = {
            "rows": read_item_rows(spec.path, artifact.items.schema),
            "source": str(spec.path),
            "position": functools.partial(position, spec),
        }
    change = ItemChange(
        block=[] if block is None else read_ids(Path(block), key),
        unblock=[] if unblock is None else read_ids(Path(unblock), key),
        remove=[] if remove is None else read_ids(Path(remove), key),
        **rows,
    )
    update = prepare_update(artifact, change)
    summary = {**update.counts(), "unchanged": update.unchanged}
    if update.empty:
        return {"version": artifact.version, "written": False, **summary}
    write_update(folder, update)
    return {"version": update.version, "written": True, **summary}


def read_item_rows(path: Path, schema: pa.Schema) -> pa.Table:
    """A CSV (comma-separated, a header line) or Parquet file of raw item rows, its
    columns of the item table read as that table's types (a value that does not
    convert is refused naming the file, its line or row, and the column).

    Raises:
        DataError: the file is unreadable, or a value does not convert.
    """
    spec = TableSpec(path)
    names = read_table(spec).table.column_names
    types = {name: schema.field(name).type for name in names if name in schema.names}
    return read_table(spec, types).table


def read_ids(path: Path, key: str) -> list[Any]:
    """The item ids a file lists: a Parquet file's column named as the item key (or its
    only column), else a text file of one id per line (blank lines skipped, a first
    line that is the key's name taken as a header: a one-column CSV reads the same).

    Raises:
        DataError: the file is missing or unreadable, or a Parquet file's column is
            not clear.
    """
    spec = TableSpec(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if spec.is_parquet:
        table = read_table(spec).table
        if key not in table.column_names and table.num_columns != 1:
            raise DataError(
                f"{path}: no column {key!r} (the item key) and more than one column: "
                f"{', '.join(map(repr, table.column_names))}"
            )
        column = key if key in table.column_names else table.column_names[0]
        return table.column(column).to_pylist()
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    ids = [line for line in lines if line]
    return ids[1:] if ids[:1] == [key] else ids


def artifact_contents(
    run_dir: Path, index: str, threads: int | None = None, as_of: str = "all"
) -> ArtifactContents:
    """Everything the artifact of a run's model holds, computed in memory.

    The model is the one whose test metrics the run reports (``reported_model``: a
    refitted run's refit); its known queries are those of the run's data as of
    ``as_of`` (``DataSource.known_queries``).
    """
    model_dir = reported_model(run_dir)
    config, pipeline, model = load_model(model_dir)
    set_threads(threads or config.threads)
    source = open_source(config)
    known = source.known_queries(as_of, pipeline)
    items = source.items()
    vectors = embed_rows(model.item_tower, known.pipeline, "item", items).cpu().numpy()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, D)
    built = build_index(choose_index(index, len(vectors)), vectors)
    recall = _index_recall(built, vectors, model.query_tower, known, items)
    return ArtifactContents(
        config=to_dict(config),
        pipeline=known.pipeline,
        query_tower=model.query_tower,
        item_tower=model.item_tower,
        items=items,
        queries=known.queries,
        query_key=source.query_key,
        item_key=source.item_key,
        item_vectors=vectors,
        seen=known.seen,
        heldout=known.heldout,
        recent=known.recent,
        index=built,
        manifest=_manifest(recall, run_dir, as_of, model_dir),
    )


def write_onnx(
    tower: Tower,
    pipeline: FeaturePipeline,
    queries: pa.Table,
    folder: Path,
    served: tuple[RecentLists, pa.Table] | None = None,
) -> dict[str, Any]:
    """Writes the query tower as ONNX into the artifact folder ``folder`` and checks it.

    The graph runs on ONNX Runtime for up to ``ONNX_CHECK_QUERIES`` known queries (a
    fixed sample, with their histories), against PyTorch on the same inputs.

    Args:
        served: the queries' recent items and the item table, for queries served from
            their state (``served_inputs``); None: the queries' rows alone.

    Returns:
        The manifest's ``onnx`` entry: the file, the input contract
        (``twotower.features.contract``), the output's shape and the check.

    Raises:
        RuntimeError: the graph's vectors differ from PyTorch's by more than
            ``ONNX_TOLERANCE`` (an exporter fault; nothing is written then).
    """
    contract = input_contract(pipeline, "query")
    shapes = {spec["name"]: spec["shape"] for spec in contract}

    def inputs(rows: np.ndarray) -> dict[str, torch.Tensor]:
        if served is None:
            return pipeline.transform("query", queries.take(rows))
        recent, items = served
        return served_inputs(pipeline, queries, recent, pipeline.history_codes(items), rows)

    example = _example_inputs(inputs(np.arange(min(64, queries.num_rows))), shapes)
    save_onnx(tower, example, shapes, folder / ONNX_FILE)
    rng = np.random.default_rng(0)
    count = min(ONNX_CHECK_QUERIES, queries.num_rows)
    rows = np.sort(rng.choice(queries.num_rows, size=count, replace=False))
    checked = inputs(rows)
    names = [spec["name"] for spec in contract]
    shape = (tower.interests, tower.output_dim)
    expected = embed_inputs(tower, [checked]).cpu().numpy()
    got = OnnxRuntime(folder / ONNX_FILE, names, shape).vectors([checked])
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


def _manifest(recall: dict[str, Any], run_dir: Path, as_of: str, model_dir: Path) -> dict[str, Any]:
    return {
        "as_of": as_of,
        # which model is served: the run's best checkpoint, or its refit (training.refit)
        "model": "refit" if model_dir != Path(run_dir) else "best",
        "twotower_version": version("twotower"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "index_recall": recall,
        "metrics": _read_metrics(run_dir),
    }


def _index_recall(
    index: Index, vectors: np.ndarray, query_tower: Tower, known: KnownQueries, items: pa.Table
) -> dict[str, Any]:
    """Recall@10 of the index against exact search, for a sample of known queries.

    The queries are searched as the service will search them: with every logged
    interaction in their history and their seen items excluded.
    """
    queries = known.queries
    rng = np.random.default_rng(0)
    count = min(RECALL_QUERIES, queries.num_rows)
    rows = np.sort(rng.choice(queries.num_rows, size=count, replace=False))
    codes = known.pipeline.history_codes(items)
    served = served_inputs(known.pipeline, queries, known.recent, codes, rows)
    vectors_q = embed_inputs(query_tower, [served]).cpu().numpy()
    vectors_q = np.ascontiguousarray(vectors_q, dtype=np.float32)
    recall = recall_against_exact(index, vectors, vectors_q, RECALL_K, known.seen[rows])
    return {"k": RECALL_K, "queries": count, "recall": recall, "exact": index.is_exact}


def _read_metrics(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / METRICS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
