"""What a data build holds, and reading one back: the one module its readers import.

Every engine writes this layout (``twotower data build``); training, evaluation, the
baselines, export and the feature fit read it through the names here, never through
an engine:

    DIR/train/part-00000.parquet ...   training interactions, ``rows_per_part`` a file,
                                       row groups of ``row_group_rows`` (the stream
                                       reader's unit of work), with history columns
    DIR/valid.parquet, DIR/test.parquet
    DIR/items.parquet                  the corpus, with the item features' columns
    DIR/queries_valid.parquet          one row per query as of each step (before
    DIR/queries_test.parquet           validation, before test, after everything): its
    DIR/queries_all.parquet            features, histories, seen items, the step's own
                                       items (targets) and its training rows
    DIR/features/                      the features fitted once
    DIR/manifest.json                  rows and sha256 of every file, written last

Columns keep the interactions' own names (``OutputColumns``), plus ``position``: an
interaction's place in the source.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from twotower.data.config import DataConfig, InteractionsConfig, SplitConfig, StreamConfig
from twotower.data.dataset import ITEM_ID, QUERY_ID, TIMESTAMP, WEIGHT
from twotower.data.splits import SPLIT_NAMES
from twotower.errors import DataError
from twotower.storage import atomic_write, read_json, sha256_file

MANIFEST = "manifest.json"
FORMAT = 2  # 2: queries_valid / queries_test for every query, columns, fitted features
FEATURES_DIR = "features"  # the fitted feature state's folder in a build
POSITION = "position"  # an interaction's place in the source, after min_weight
TRAIN_INTERACTIONS = "train_interactions"
# what a query's row in queries_valid / queries_test holds besides its id, features
# and histories: the items known before the part, the part's items, its training rows
SEEN, TARGETS = "seen", "targets"
# a query's state as of each step: before validation, before test, after everything
# (for serving; its targets are empty), in queries_{step}.parquet
STEPS = ("valid", "test", "all")
QUERY_COLUMNS = (SEEN, TARGETS, TRAIN_INTERACTIONS)


@dataclasses.dataclass(frozen=True)
class OutputColumns:
    """The columns a build writes, under the user's own names: plain names, which each
    engine quotes in its own dialect.

    Attributes:
        roles: canonical column -> the interactions' name for it (``user_id``, ...).
        query: the query features' columns joined into every row: name -> where it
            comes from (``key``: the query id; else the query table's column).
        item: the item features' columns of ``items.parquet``, likewise.
    """

    roles: dict[str, str]
    query: dict[str, str]
    item: dict[str, str]


def interaction_roles(spec: InteractionsConfig) -> dict[str, str]:
    """The interactions' column for each canonical role (query and item id, and the
    timestamp and weight where named)."""
    roles = {QUERY_ID: spec.query_id, ITEM_ID: spec.item_id}
    if spec.timestamp:
        roles[TIMESTAMP] = spec.timestamp
    if spec.weight:
        roles[WEIGHT] = spec.weight
    return roles


def output_columns(data: DataConfig, columns: dict[str, list[str]]) -> OutputColumns:
    """Which columns a build writes, and from where (see ``OutputColumns``);
    ``columns``: each side's feature columns."""
    spec = data.interactions
    assert spec is not None
    sides = {}
    for side, table, id_column in (
        ("query", data.queries, spec.query_id),
        ("item", data.items, spec.item_id),
    ):
        key = table.key if table is not None else id_column
        sides[side] = {c: "key" if c == key else c for c in columns.get(side, []) if c != id_column}
    return OutputColumns(interaction_roles(spec), sides["query"], sides["item"])


def write_build_manifest(
    staging: Path,
    engine: str,
    split: SplitConfig,
    histories: dict[str, int],
    rule: str | None,
    columns: OutputColumns,
    files: dict[str, dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    """Writes ``manifest.json`` into ``staging``, last: the build's format, engine,
    columns, split and histories (``rule``: the history rule applied), each part's
    rows and each file's rows and sha256. Returns the manifest."""
    manifest = {
        "format": FORMAT,
        "engine": engine,
        "columns": columns.roles,
        "split": dataclasses.asdict(split),
        "histories": dict(histories),
        "history_rule": rule if histories else None,
        "rows": {
            name: sum(f["rows"] for p, f in files.items() if _part_of(p) == name)
            for name in SPLIT_NAMES
        },
        "files": files,
        "seconds": round(seconds, 3),
    }
    text = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    atomic_write(staging / MANIFEST, lambda f: f.write(text))
    return manifest


def _part_of(path: str) -> str | None:
    part = path.split("/")[0].removesuffix(".parquet")
    return part if part in SPLIT_NAMES else None


def read_build_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a build, every file checked against its rows and sha256.

    Raises:
        DataError: no manifest (not a finished build), a build of another format, or a
            file missing or changed.
    """
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST, "not a finished data build (no manifest.json)")
    if manifest.get("format") != FORMAT:
        raise DataError(
            f"{folder}: a data build of format {manifest.get('format')!r}; this version reads "
            f"format {FORMAT}: build it again (twotower data build)"
        )
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path}: listed in the build's manifest but missing")
        if sha256_file(path) != expected["sha256"]:
            raise DataError(f"{path}: checksum mismatch; the build's file was changed")
    return manifest


def built_stream(stream: StreamConfig) -> StreamConfig:
    """``stream`` with a build's files and columns in place of ``built`` (checked by
    ``read_build_manifest``)."""
    folder = stream.built
    if folder is None:
        return stream
    roles = read_build_manifest(folder)["columns"]
    return dataclasses.replace(stream, **stream_files(folder, roles))


def stream_files(folder: Path, roles: dict[str, str]) -> dict[str, Any]:
    """The ``StreamConfig`` fields that read the build in ``folder``, whose columns
    for each role (``OutputColumns.roles``) are ``roles``."""
    return {
        "built": None,
        "train": folder / "train",
        "valid": folder / "valid.parquet",
        "test": folder / "test.parquet",
        "items": folder / "items.parquet",
        "query_id": roles[QUERY_ID],
        "item_id": roles[ITEM_ID],
        "weight": roles.get(WEIGHT),
    }
