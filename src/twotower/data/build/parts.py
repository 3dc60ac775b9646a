"""The plan's split: each interaction's part by the split's rules, equal row for row to
``split_interactions`` in memory.

    leave_last_out, time   window functions and quantiles over the rows
    random                 numpy's draw for each position (the in-memory split's own
                           stream, drawn in chunks and written beside the tables),
                           ranked per query
    given                  the part of the file each row came from
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from twotower.data.build.format import POSITION
from twotower.data.build.inputs import PART
from twotower.data.build.job import Database
from twotower.data.config import SplitConfig
from twotower.data.dataset import QUERY_ID, TIMESTAMP
from twotower.errors import DataError

DRAWS = "draws.parquet"  # the random split's draws, in the staging folder while it runs
_DRAW_CHUNK = 1 << 22


def assign_parts(db: Database, split: SplitConfig, staging: Path) -> None:
    """Adds column ``part`` (0 train, 1 valid, 2 test) to table ``interactions``.

    Raises:
        DataError: ``given`` without the user's files, ``time`` without timestamps, or
            a validation cut-off after the test one.
    """
    columns = db.columns("interactions")
    if split.method == "given":
        if PART not in columns:
            raise DataError(
                "split method 'given' needs your own files: set data.valid and data.test "
                "beside data.interactions"
            )
        return
    q = db.dialect.quote
    if split.method == "leave_last_out":
        order = f"{q(TIMESTAMP)}, {POSITION}" if TIMESTAMP in columns else POSITION
        part = """CASE WHEN n - 1 - rank = 0 AND n >= 2 THEN 2
            WHEN n - 1 - rank = 1 AND n >= 3 THEN 1 ELSE 0 END"""
        ranked = _ranked(db, order, "interactions i")
    elif split.method == "random":
        part, ranked = _random_rule(db, split, staging)
    else:  # time
        part, ranked = _time_rule(db, split, TIMESTAMP in columns), "SELECT * FROM interactions"
    keep = ", ".join(q(c) for c in columns)
    db.create("interactions", f"SELECT {keep}, CAST({part} AS TINYINT) AS {PART} FROM ({ranked}) i")


def _random_rule(db: Database, split: SplitConfig, staging: Path) -> tuple[str, str]:
    """The random split's CASE and ranked rows: each query's rows ranked by their draws,
    the first ``round(n * train)`` training rows, as in memory."""
    rows = db.rows("SELECT count(*) FROM interactions")[0][0]
    write_draws(rows, split.seed, staging / DRAWS)
    db.parquet("draws", staging / DRAWS)
    train, valid = split.ratios[0], split.ratios[0] + split.ratios[1]
    round_even = db.dialect.round_even
    part = f"""CASE WHEN rank < {round_even(f"n * CAST({train!r} AS DOUBLE)")} THEN 0
        WHEN rank < {round_even(f"n * CAST({valid!r} AS DOUBLE)")} THEN 1 ELSE 2 END"""
    source = f"interactions i JOIN draws d ON i.{POSITION} = d.{POSITION}"
    return part, _ranked(db, f"d.u, i.{POSITION}", source)


def _ranked(db: Database, order: str, source: str) -> str:
    """The rows of ``source`` (interactions ``i``) with each one's ``rank`` (0-based)
    by ``order`` among its query's ``n`` rows."""
    query = f"i.{db.dialect.quote(QUERY_ID)}"
    return (
        f"SELECT i.*, row_number() OVER (PARTITION BY {query} ORDER BY {order}) - 1 AS rank, "
        f"count(*) OVER (PARTITION BY {query}) AS n FROM {source}"
    )


def _time_rule(db: Database, split: SplitConfig, has_time: bool) -> str:
    """The time split's CASE: cut-offs given, or the timestamps' quantiles."""
    if not has_time:
        raise DataError("split method 'time' needs a timestamp column")
    _, r_valid, r_test = split.ratios
    test_from, valid_from = split.test_from, split.valid_from
    if test_from is None:
        test_from = _quantile(db, 1 - r_test)
    if valid_from is None:
        valid_from = _quantile(db, 1 - r_test - r_valid)
    if valid_from > test_from:
        raise DataError(f"split: valid_from ({valid_from}) is after test_from ({test_from})")
    time = db.dialect.quote(TIMESTAMP)
    return f"""CASE WHEN {time} >= {test_from!r} THEN 2
        WHEN {time} >= {valid_from!r} THEN 1 ELSE 0 END"""


def _quantile(db: Database, q: float) -> float:
    """numpy's default (linear) quantile of the timestamps, as ``np.quantile``."""
    count = db.rows("SELECT count(*) FROM interactions")[0][0]
    value = f"CAST({db.dialect.quote(TIMESTAMP)} AS DOUBLE)"

    def pair(k: int) -> list[float]:
        return [row[0] for row in db.rows(db.dialect.sorted_pair(value, "interactions", k))]

    return linear_quantile(count, q, pair)


def write_draws(rows: int, seed: int, path: Path) -> None:
    """``path``: (position, u) for positions 0..rows-1, u numpy's
    ``default_rng(seed).random`` draw for that position: the stream the in-memory random
    split draws, written in chunks."""
    rng = np.random.default_rng(seed)
    schema = pa.schema([(POSITION, pa.int64()), ("u", pa.float64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, _DRAW_CHUNK):
            count = min(_DRAW_CHUNK, rows - start)
            positions = np.arange(start, start + count, dtype=np.int64)
            table = pa.table({POSITION: positions, "u": rng.random(count)}, schema=schema)
            writer.write_table(table)


def linear_quantile(count: int, q: float, sorted_pair: Any) -> float:
    """numpy's default (linear) quantile ``q`` of ``count`` values, given
    ``sorted_pair(k)``: the k-th and (k+1)-th smallest values (the second may be absent)."""
    h = (count - 1) * q
    low = int(np.floor(h))
    pair = sorted_pair(low)
    a = pair[0]
    b = pair[1] if len(pair) > 1 else a
    return float(np.quantile(np.array([a, b], dtype=np.float64), h - low)) if b != a else float(a)
