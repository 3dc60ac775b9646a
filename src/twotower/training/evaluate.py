"""A trained model ranked against the whole corpus, on any data source.

``evaluate_source`` ranks the queries a ``DataSource`` holds for a part, a chunk at a
time (all at once in memory; a row group of a data build at a time): each chunk's raw
rows are transformed as of the part, embedded and ranked against every item's vector,
seen items excluded. It is what ``twotower evaluate`` and export's view of a run read,
whichever source the run trained on.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from twotower.evaluation.ranking import HeldOut, evaluate_chunks
from twotower.features.pipeline import FeaturePipeline
from twotower.sources import DataSource
from twotower.towers.model import TwoTower, embed_rows, interest_scores


def evaluate_source(
    model: TwoTower,
    source: DataSource,
    pipeline: FeaturePipeline,
    part: str,
    ks: list[int] | tuple[int, ...],
    exclude_seen: bool = True,
    batch_size: int = 1024,
    sample: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Exact full-corpus metrics of ``model`` on ``part`` of ``source``.

    Args:
        model: the trained model.
        source: the run's data (``twotower.sources.open_source``).
        pipeline: the run's fitted features.
        part: ``valid`` or ``test``.
        ks: the cutoffs.
        exclude_seen: drop each query's seen items from its ranking and held-out items.
        batch_size: queries embedded and scored at once.
        sample: rank about this many queries, a seeded sample (a data build only;
            ``DataSource.held_out``); None: every query.
        seed: the sample's seed.

    Returns:
        ``{part}/{metric}@{k}``, ``popularity@k`` of the items known before the part,
        and ``{part}/queries`` (``twotower.evaluation.ranking.evaluate_chunks``).
    """
    device = next(model.parameters()).device
    items = embed_rows(model.item_tower, pipeline, "item", source.items(), batch_size)

    def chunks() -> Iterator[HeldOut]:
        for chunk in source.held_out(part, pipeline, sample, seed):
            assert chunk.queries is not None and chunk.pipeline is not None
            queries = embed_rows(
                model.query_tower, chunk.pipeline, "query", chunk.queries, batch_size
            )

            def score(rows: np.ndarray, queries: torch.Tensor = queries) -> torch.Tensor:
                return interest_scores(queries[torch.from_numpy(rows).to(device)], items)

            yield HeldOut(score, chunk.targets, chunk.seen)

    total = source.num_queries(part)
    with torch.no_grad():
        return evaluate_chunks(
            chunks(),
            part,
            len(items),
            ks,
            exclude_seen,
            batch_size,
            source.popularity(part),
            total if sample is None else min(total, sample),
        )
