"""Precomputed query vectors: every known query's tower output, computed offline and
served instead of a tower pass.

A deployment that refreshes user vectors offline writes them with ``twotower export
--query-vectors FILE`` (or ``write_query_vectors`` from a job of its own) and serves
them with ``twotower serve ARTIFACT --query-vectors FILE``. The file:

    FILE (Parquet)   one row per known query
        <query key>  the artifact's query key column, with its type
        vector       fixed-size list of float32: D values, or K x D (row-major) for a
                     K-interest query tower
        artifact     the fingerprint of the artifact whose tower computed the vector (of
                     its version 1: ``Artifact.base_fingerprint``)

Vectors from one artifact's tower only make sense beside that artifact's item vectors,
so a file is refused for any other artifact (the fingerprint names it). Its later
versions (items changed in place) keep the users and the query tower, so a file
written for one version serves every other. A known query
without a row in the file is answered by the tower, as without the file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from twotower.errors import DataError
from twotower.serving.artifact import Artifact
from twotower.storage import atomic_write
from twotower.towers.model import embed_inputs

VECTOR = "vector"
ARTIFACT = "artifact"


@dataclasses.dataclass(frozen=True)
class QueryVectors:
    """A query vectors file, aligned with an artifact's query rows.

    Attributes:
        path: the file it was read from.
        vectors: (U, D), or (U, K, D) for K interests, float32; row u is the artifact's
            query row u (zeros where ``present`` is false).
        present: (U,) whether the file holds query row u's vector.
    """

    path: Path
    vectors: np.ndarray
    present: np.ndarray


def query_vectors(artifact: Artifact, batch_size: int = 4096) -> np.ndarray:
    """(U, D) or (U, K, D) float32: each known query's vector, as a request for that
    user computes it (its stored row and history through the query tower)."""
    count = artifact.queries.num_rows
    chunks = (
        artifact.known_inputs(np.arange(start, min(start + batch_size, count)))
        for start in range(0, count, batch_size)
    )
    vectors = embed_inputs(artifact.query_tower, chunks)
    return np.ascontiguousarray(vectors.cpu().numpy(), dtype=np.float32)


def write_query_vectors(artifact: Artifact, path: Path) -> int:
    """Writes every known query's vector to ``path`` (atomically); returns how many."""
    vectors = query_vectors(artifact)
    flat = vectors.reshape(len(vectors), -1)
    keys = artifact.queries.column(artifact.query_key)
    table = pa.table(
        {
            artifact.query_key: keys,
            VECTOR: pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1]),
            ARTIFACT: pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(len(flat), np.int32)), pa.array([artifact.base_fingerprint])
            ),
        }
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: pq.write_table(table, f))
    return len(flat)


def read_query_vectors(path: Path, artifact: Artifact) -> QueryVectors:
    """Reads a query vectors file for ``artifact``.

    Raises:
        DataError: the file is unreadable, lacks a column, holds vectors of another
            artifact or of another width, names a query the artifact does not know or
            one twice, or holds a value that is not finite (each named).
    """
    path = Path(path)
    key = artifact.query_key
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    missing = [c for c in (key, VECTOR, ARTIFACT) if c not in table.column_names]
    if missing:
        raise DataError(
            f"{path}: lacks column(s) {', '.join(map(repr, missing))}; a query vectors file "
            f"has {key!r}, {VECTOR!r} and {ARTIFACT!r} (twotower export --query-vectors)"
        )
    fingerprints = pc.unique(pc.cast(table.column(ARTIFACT), pa.string())).to_pylist()
    other = [f for f in fingerprints if f != artifact.base_fingerprint]
    if other:
        raise DataError(
            f"{path}: vectors of artifact {other[0]!r}, not of {artifact.base_fingerprint!r} "
            f"({artifact.folder}); compute them with this artifact's tower "
            "(twotower export --query-vectors)"
        )
    interests, dim = artifact.query_tower.interests, artifact.index.dim
    width = interests * dim
    column = table.column(VECTOR).combine_chunks()
    if column.null_count:
        raise DataError(f"{path}: {column.null_count} row(s) of {VECTOR!r} hold no vector")
    list_size = getattr(column.type, "list_size", None)
    if list_size != width or not pa.types.is_floating(column.type.value_type):
        raise DataError(
            f"{path}: column {VECTOR!r} is {column.type}, not fixed-size lists of "
            f"{width} floats ({interests} x {dim}, this artifact's query vectors)"
        )
    rows = artifact.query_rows(table.column(key).to_pylist())
    if (rows < 0).any():
        first = table.column(key)[int(np.argmax(rows < 0))].as_py()
        raise DataError(
            f"{path}: {int((rows < 0).sum())} key(s) the artifact does not know "
            f"(first: {first!r}); only the artifact's known queries have vectors"
        )
    counts = np.bincount(rows, minlength=artifact.queries.num_rows)
    if (counts > 1).any():
        twice = artifact.queries.column(key)[int(np.argmax(counts > 1))].as_py()
        raise DataError(f"{path}: query {twice!r} has more than one row")
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    values = values.reshape(len(rows), *((dim,) if interests == 1 else (interests, dim)))
    if not np.isfinite(values).all():
        bad = table.column(key)[int(np.argmax(~np.isfinite(values).reshape(len(rows), -1).all(1)))]
        raise DataError(f"{path}: query {bad.as_py()!r} has a vector that is not finite")
    vectors = np.zeros((artifact.queries.num_rows, *values.shape[1:]), np.float32)
    vectors[rows] = values
    return QueryVectors(path, vectors, counts > 0)
