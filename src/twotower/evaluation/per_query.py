"""Each evaluated query's own metrics (``twotower evaluate --per-user FILE``).

One row per evaluated query and part: ``part``, ``query_id``, ``train_count`` (the
items it knew before the part), ``group`` (its activity group, ``few``/``some``/
``many``, cut as ``twotower.evaluation.groups`` cuts them), ``held_out`` (its held-out
items ranked), then every metric at every cutoff. The mean of a metric's column over a
part's rows is that part's metric; over a group's rows, the group's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from twotower.evaluation.groups import QUERY_GROUPS, activity_cutoffs, query_groups
from twotower.evaluation.metrics import RowMetrics
from twotower.storage import atomic_write


class QueryMetrics:
    """Each evaluated query's metrics, gathered as ``evaluate_chunks`` ranks them:
    ``add`` per chunk, ``end_part`` per part, then ``table``."""

    def __init__(self) -> None:
        self.parts: list[pa.Table] = []
        self.chunks: list[pa.Table] = []

    def add(self, ids: pa.Array, counts: np.ndarray, metrics: RowMetrics) -> None:
        """Keeps a chunk's counted rows: (Qc,) query ids, training counts and metrics."""
        columns = {
            "query_id": ids,
            "train_count": pa.array(np.asarray(counts, dtype=np.int64)),
            "held_out": pa.array(np.asarray(metrics.held_out, dtype=np.int64)),
        }
        for name, values in metrics.values.items():
            columns[name] = pa.array(np.asarray(values, dtype=np.float64))
        self.chunks.append(pa.table(columns))

    def end_part(self, part: str) -> None:
        """Closes ``part``: its rows get the part's name and their activity group, cut
        at the terciles of the part's counts."""
        table = pa.concat_tables(self.chunks) if self.chunks else None
        self.chunks = []
        if table is None or table.num_rows == 0:  # no query of the part was evaluated
            return
        counts = table.column("train_count").to_numpy()
        groups = query_groups(counts, activity_cutoffs(np.bincount(counts)))
        names = np.asarray(QUERY_GROUPS, dtype=object)[groups]
        table = table.add_column(0, "part", pa.array([part] * table.num_rows, pa.string()))
        self.parts.append(table.add_column(3, "group", pa.array(names, pa.string())))

    def table(self) -> pa.Table:
        """Every closed part's rows (see the module doc); empty when none was ranked."""
        if not self.parts:
            return pa.table({"part": pa.array([], pa.string())})
        return pa.concat_tables(self.parts, promote_options="default")


def write_query_metrics(table: pa.Table, path: Path) -> None:
    """Writes ``table`` atomically: Parquet if ``path`` ends in ``.parquet``, else CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        atomic_write(path, lambda f: pq.write_table(table, f))
    else:
        atomic_write(path, lambda f: pacsv.write_csv(table, f))
