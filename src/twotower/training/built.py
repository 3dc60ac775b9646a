"""A model ranked on a data build, query chunk by query chunk (``twotower evaluate`` of
a run trained on ``data.stream.built``).

The build's ``queries_valid.parquet`` / ``queries_test.parquet`` hold one row per query:
its features and histories as of the part, the items it knew before it (``seen``) and
the part's own items (``targets``). Each row group is transformed, embedded and ranked
against the whole corpus, exactly as ``evaluate_model`` ranks the in-memory split; what
is in memory is the corpus and its vectors, one row group of queries, and one count per
item. Every query is ranked, not a sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from twotower.data.build.format import SEEN, TARGETS
from twotower.data.config import StreamConfig
from twotower.data.stream import ParquetStream
from twotower.evaluation.ranking import HeldOut, evaluate_chunks
from twotower.features.pipeline import FeaturePipeline
from twotower.features.streaming import ItemKeys, item_matrix, read_items, stream_query_columns
from twotower.towers.model import TwoTower, embed_rows, interest_scores


def evaluate_built(
    model: TwoTower,
    stream: StreamConfig,
    folder: Path,
    pipeline: FeaturePipeline,
    part: str,
    ks: list[int] | tuple[int, ...],
    exclude_seen: bool = True,
    batch_size: int = 1024,
    sample: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Exact full-corpus metrics of ``model`` on ``part`` of the build ``folder``.

    Args:
        model: the trained model.
        stream: the build as a stream (``twotower.data.build.format.built_stream``).
        folder: the build folder.
        pipeline: the run's fitted features.
        part: ``valid`` or ``test``.
        ks: the cutoffs.
        exclude_seen: drop each query's seen items from its ranking and held-out items.
        batch_size: queries embedded and scored at once.
        sample: rank about this many queries, each row of the part kept with
            probability sample / rows by a generator seeded with ``seed`` (the same
            rows every time); None: every query.

    Returns:
        As ``evaluate_model``: ``{part}/{metric}@{k}``, ``popularity@k`` of the items
        known before the part, and ``{part}/queries``.
    """
    if part not in ("valid", "test"):
        raise ValueError(f"part must be 'valid' or 'test', got {part!r}")
    path = Path(folder) / f"queries_{part}.parquet"
    items = read_items(stream, pipeline.config)
    keys = ItemKeys(items.column(stream.item_id).combine_chunks(), str(stream.items))
    device = next(model.parameters()).device
    item_vectors = embed_rows(model.item_tower, pipeline, "item", items, batch_size)
    columns = sorted({stream.query_id, *stream_query_columns(pipeline.config), SEEN, TARGETS})
    queries = ParquetStream(path, columns)
    num_items = items.num_rows
    popularity = np.zeros(num_items, np.float64)
    seen_only = ParquetStream(path, [SEEN])
    for table in seen_only.read(seen_only.share(None, 0, 1)):
        popularity += item_matrix(table.column(SEEN), keys, num_items, path).sum(axis=0).A1

    keep = 1.0 if sample is None else min(1.0, sample / max(queries.num_rows, 1))
    rng = np.random.default_rng(seed)

    def chunks() -> Iterator[HeldOut]:
        for table in queries.read(queries.share(None, 0, 1)):
            if keep < 1.0:
                table = table.filter(rng.random(table.num_rows) < keep)
            vectors = embed_rows(model.query_tower, pipeline, "query", table, batch_size)

            def score(rows: np.ndarray, vectors: torch.Tensor = vectors) -> torch.Tensor:
                return interest_scores(vectors[torch.from_numpy(rows).to(device)], item_vectors)

            seen, held_out = (
                item_matrix(table.column(c), keys, num_items, path) for c in (SEEN, TARGETS)
            )
            yield HeldOut(score, held_out, seen)

    with torch.no_grad():
        return evaluate_chunks(
            chunks(),
            part,
            num_items,
            ks,
            exclude_seen,
            batch_size,
            popularity,
            total=round(queries.num_rows * keep),
        )
