"""What the retrieval explorer page shows, read from the artifact being served.

The page itself (``explorer.html``, plain HTML and JavaScript, no build step) is served
at ``GET /``; it retrieves through the service's own ``/recall`` and
``/items/{id}/similar`` and reads rows through these lookups:

- ``suggest``: known query ids that start with what was typed;
- ``query_record``: a query's raw feature values and its history: the items its
  history feature holds (most recent first) where it has one, else every item it
  interacted with; and, for artifacts that carry the run's split, its held-out test
  items and the items it saw before them (to rank as the evaluation does);
- ``item_records``: items' raw fields (title, genres, ...) by id;
- ``projection``: every item vector's coordinates on the first two principal
  components (computed once per artifact from the item vectors: a D x D covariance
  and its eigenvectors), for a map of the corpus with the items on screen marked.

Each is a handful of vectorized Arrow operations on the artifact's tables.
"""

from __future__ import annotations

import functools
import math
import threading
from importlib.resources import files
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twotower.features.categorical import IdTransform
from twotower.features.history import HistoryTransform
from twotower.serving.artifact import Artifact
from twotower.serving.query import UnknownItemError, UnknownQueryError
from twotower.serving.schemas import MAX_EXCLUDE

MAX_SUGGESTIONS = 50
MAX_HISTORY = 50
MAX_MAP_POINTS = 5000


@functools.cache
def page() -> str:
    """The explorer page's HTML."""
    return files("twotower.serving").joinpath("explorer.html").read_text(encoding="utf-8")


def info(artifact: Artifact) -> dict[str, Any]:
    """What the page needs to know before the first lookup."""
    return {
        "artifact": artifact.fingerprint,
        "query_key": artifact.query_key,
        "item_key": artifact.item_key,
        "items": artifact.items.num_rows,
        "queries": artifact.queries.num_rows,
        "text_search": bool(_text_columns(artifact)),
        "heldout": artifact.heldout is not None,
        "item_fields": [c for c in artifact.items.column_names if c != artifact.item_key],
    }


def suggest(artifact: Artifact, prefix: str, limit: int) -> list[Any]:
    """Up to ``limit`` known query ids whose text starts with ``prefix``, in table order."""
    keys = artifact.queries.column(artifact.query_key)
    matches = pc.starts_with(pc.cast(keys, pa.string()), prefix)
    rows = np.flatnonzero(matches.to_numpy(zero_copy_only=False))[:limit]
    return keys.take(pa.array(rows, pa.int64())).to_pylist()


def query_record(artifact: Artifact, query_id: Any) -> dict[str, Any]:
    """A known query's features and history.

    Raises:
        UnknownQueryError: the artifact has no such query.
    """
    (row,) = artifact.query_rows([query_id])
    if row < 0:
        raise UnknownQueryError([query_id])
    features = _plain_row(artifact.queries.slice(int(row), 1))
    items, kind = _history(artifact, artifact.queries.column(artifact.query_key)[int(row)])
    if items is None:
        seen = artifact.seen[int(row)].indices
        items, kind = np.sort(seen), "every item it interacted with"
    ids = artifact.item_ids.take(pa.array(items[:MAX_HISTORY], pa.int64())).to_pylist()
    record = {
        "id": features[artifact.query_key],
        "features": features,
        "history": item_records(artifact, ids),
        "history_kind": kind,
        "history_total": int(len(items)),
        "heldout": [],
        "before_heldout": [],
    }
    if artifact.heldout is not None:  # the split's test items, and what came before them
        heldout = artifact.heldout[int(row)].indices
        before = np.setdiff1d(artifact.seen[int(row)].indices, heldout)[:MAX_EXCLUDE]
        record["heldout"] = artifact.item_ids.take(pa.array(heldout, pa.int64())).to_pylist()
        record["before_heldout"] = artifact.item_ids.take(pa.array(before, pa.int64())).to_pylist()
    return record


def item_records(artifact: Artifact, item_ids: list[Any]) -> list[dict[str, Any]]:
    """Each item's raw fields, keyed by column name, in the order asked.

    Raises:
        UnknownItemError: an id is not in the item table.
    """
    table = artifact.items.take(pa.array(_item_rows(artifact, item_ids), pa.int64()))
    return [_plain(record) for record in table.to_pylist()]


def items_on_map(artifact: Artifact, item_ids: list[Any]) -> dict[str, list]:
    """``{"items": item_records, "points": their (x, y) on the map}``, in the order asked."""
    rows = _item_rows(artifact, item_ids)
    table = artifact.items.take(pa.array(rows, pa.int64()))
    return {
        "items": [_plain(record) for record in table.to_pylist()],
        "points": np.round(projection(artifact)[rows], 4).tolist(),
    }


def _item_rows(artifact: Artifact, item_ids: list[Any]) -> np.ndarray:
    rows = artifact.item_rows(item_ids)
    if (rows < 0).any():
        raise UnknownItemError([i for i, r in zip(item_ids, rows, strict=True) if r < 0])
    return rows


_projections: dict[str, np.ndarray] = {}  # artifact fingerprint -> (N, 2)
_projection_lock = threading.Lock()


def projection(artifact: Artifact) -> np.ndarray:
    """(N, 2) float32: the item vectors on their first two principal components, scaled
    so that the larger coordinate range is [-1, 1]. Cached for the last few artifacts."""
    with _projection_lock:
        cached = _projections.get(artifact.fingerprint)
        if cached is not None:
            return cached
        vectors = artifact.item_vectors.astype(np.float64)
        centered = vectors - vectors.mean(axis=0)
        _, axes = np.linalg.eigh(centered.T @ centered)  # ascending eigenvalues
        points = centered @ axes[:, ::-1][:, :2]
        points /= max(float(np.abs(points).max()), 1e-12)
        points = points.astype(np.float32)
        while len(_projections) >= 2:  # one artifact served, one being swapped in
            _projections.pop(next(iter(_projections)))
        _projections[artifact.fingerprint] = points
        return points


def corpus_map(artifact: Artifact, limit: int) -> dict[str, Any]:
    """Up to ``limit`` items' map coordinates, evenly strided over the corpus."""
    points = projection(artifact)
    rows = np.unique(np.linspace(0, len(points) - 1, min(limit, len(points))).astype(np.int64))
    return {
        "ids": artifact.item_ids.take(pa.array(rows)).to_pylist(),
        "points": np.round(points[rows], 4).tolist(),
    }


def _history(artifact: Artifact, key: pa.Scalar) -> tuple[np.ndarray | None, str]:
    """(item rows, description) from the query side's history feature, most recent first;
    (None, "") when there is none or its item feature is hashed (not decodable)."""
    for name, transform in artifact.pipeline.transforms["query"].items():
        if not isinstance(transform, HistoryTransform):
            continue
        ids = artifact.pipeline.transforms["item"].get(transform.spec.item_feature)
        if not isinstance(ids, IdTransform) or ids.spec.hash_buckets:
            continue
        codes = transform.transform(pa.array([key.as_py()], key.type))[0]
        codes = codes[codes >= 2]  # 0 padding, 1 an item unknown at fitting
        item_keys = ids.vocabulary.values.take(pa.array(codes - 2, pa.int64()))
        rows = artifact.item_rows(item_keys.to_pylist())
        return rows[rows >= 0], f"the history feature {name!r}, most recent first"
    return None, ""


def _text_columns(artifact: Artifact) -> list[str]:
    return [
        t.spec.column
        for t in artifact.pipeline.transforms["query"].values()
        if t.spec.kind == "text"
    ]


def _plain_row(table: pa.Table) -> dict[str, Any]:
    return _plain(table.to_pylist()[0])


def _plain(value: Any) -> Any:
    """JSON-safe: NaN and infinities become None, bytes their repr."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return repr(value)
    if not isinstance(value, (str, int, float, bool, type(None))):
        return str(value)  # dates, decimals
    return value
