"""What the retrieval explorer page shows, read from the artifact being served and
its users' state store.

The page itself (``explorer.html``, plain HTML and JavaScript, no build step) is served
at ``GET /``; it retrieves through the service's own ``/recall`` and
``/items/{id}/similar`` and reads rows through these lookups:

- ``suggest``: the artifact's known query ids that start with what was typed (none
  where the artifact's users are not loaded, their state being in an online store:
  the list is then empty and any user id may still be typed);
- ``query_record``: a user's state as the store holds it now, events included: its
  raw feature values and its recent items, most recent first (where no history
  feature reads them, every item it interacted with); and, for artifacts that carry
  the run's split and hold the user, its held-out test items and the items it saw
  besides them (to rank as the evaluation does);
- ``item_records``: items' raw fields (title, genres, ...) by id;
- ``projection``: every item vector's coordinates on the first two principal
  components (computed once per artifact version from the item rows' current vectors:
  a D x D covariance and its eigenvectors), for a map of the corpus with the items on
  screen marked; the map leaves out removed items.

Each is one read of the store and a handful of vectorized Arrow operations on the
artifact's tables.
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

from twotower.serving.artifact import Artifact
from twotower.serving.query import UnknownItemError, UnknownQueryError
from twotower.serving.schemas import MAX_EXCLUDE
from twotower.serving.stores.base import StateStore

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
        "items": int(artifact.catalogue.known.sum()),  # removed items are unknown
        "queries": artifact.queries.num_rows,
        "users": artifact.users,
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


def query_record(artifact: Artifact, store: StateStore, query_id: Any) -> dict[str, Any]:
    """A user's state as the store holds it now (events included): its stored feature
    values and recent items (where no history feature reads recent items, every item it
    interacted with); and where the artifact carries the run's split and holds the user,
    its held-out items and the other items it interacted with.

    Items the artifact does not hold (a store written for another artifact) are left out.

    Raises:
        UnknownQueryError: the store does not know the user.
        StoreUnavailableError: the store cannot be reached.
    """
    states = store.read([query_id])
    if not states.known[0]:
        raise UnknownQueryError([query_id])
    (row,) = artifact.query_rows([query_id])
    seen = _known_item_rows(artifact, states.seen[0])
    width = artifact.pipeline.recent_length
    if width:
        items = _known_item_rows(artifact, [item for item, _ in states.recent[0]])
        kind = (
            "the user's recent items in the state store, most recent first "
            f"(the history features read the latest {width})"
        )
    else:
        items, kind = np.sort(seen), "every item it interacted with"
    ids = artifact.item_ids.take(pa.array(items[:MAX_HISTORY], pa.int64())).to_pylist()
    heldout, before = _split_items(artifact, row, seen)
    return {
        "id": artifact.queries.column(artifact.query_key)[row].as_py() if row >= 0 else query_id,
        "features": _plain(states.features[0]),
        "history": item_records(artifact, ids),
        "history_kind": kind,
        "history_total": int(len(items)),
        "heldout": artifact.item_ids.take(pa.array(heldout, pa.int64())).to_pylist(),
        "before_heldout": artifact.item_ids.take(pa.array(before, pa.int64())).to_pylist(),
    }


def _split_items(artifact: Artifact, row: int, seen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(held-out item rows, the other ``seen`` item rows, at most ``MAX_EXCLUDE``) of
    query ``row`` under the run's split; none where the artifact carries no split, and
    no held-out ones where it does not hold the user (``row`` -1)."""
    none = np.zeros(0, np.int64)
    if artifact.heldout is None:
        return none, none
    heldout = artifact.heldout[int(row)].indices if row >= 0 else none
    return heldout, np.setdiff1d(seen, heldout)[:MAX_EXCLUDE]


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


def _known_item_rows(artifact: Artifact, item_ids: list[Any]) -> np.ndarray:
    """(n,) int64 the item rows of those of ``item_ids`` the artifact holds, in order."""
    rows = artifact.item_rows(item_ids) if item_ids else np.zeros(0, np.int64)
    return rows[rows >= 0]


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
    """Up to ``limit`` items' map coordinates, evenly strided over the items the
    catalogue knows (a removed item is not on the map)."""
    points = projection(artifact)
    known = np.flatnonzero(artifact.catalogue.known)
    if not len(known):
        return {"ids": [], "points": []}
    picks = np.linspace(0, len(known) - 1, min(limit, len(known))).astype(np.int64)
    rows = known[np.unique(picks)]
    return {
        "ids": artifact.item_ids.take(pa.array(rows)).to_pylist(),
        "points": np.round(points[rows], 4).tolist(),
    }


def _text_columns(artifact: Artifact) -> list[str]:
    return [
        t.spec.column
        for t in artifact.pipeline.transforms["query"].values()
        if t.spec.kind == "text"
    ]


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
