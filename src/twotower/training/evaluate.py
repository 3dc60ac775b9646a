"""A trained model ranked against the whole corpus, seen items excluded.

Two views of the same ranking (``twotower.evaluation.ranking``):

- ``evaluate_model`` ranks the queries of the trainer's own examples
  (``TrainingExamples``: every query's inputs already transformed, on the device),
  each epoch's validation and a run's final metrics, on any source, a plain stream
  included (its examples hold a sample of queries).
- ``evaluate_source`` ranks the queries a ``DataSource`` holds for a part, a chunk at a
  time (all at once in memory; a row group of a data build at a time): each chunk's raw
  rows are transformed as of the part and embedded as serving embeds them. It is what
  ``twotower evaluate`` reads, whichever source the run trained on. On data in memory
  the two give the same metrics (tests/test_export.py checks an export's answers
  against both).

Both report the metrics by item popularity and query activity group too
(``twotower.evaluation.groups``) unless ``groups=False`` (each epoch's validation).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from twotower.evaluation.per_query import QueryMetrics
from twotower.evaluation.ranking import HeldOut, evaluate, evaluate_chunks
from twotower.features.pipeline import FeaturePipeline
from twotower.sources import DataSource, QueryChunk
from twotower.towers.model import TwoTower, embed_rows, interest_scores
from twotower.training.examples import TrainingExamples


@torch.inference_mode()
def embed_all(
    model: TwoTower, data: TrainingExamples, batch_size: int, part: str = "valid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, D) every query's vector as of ``part`` and (N, D) every item's, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        sides = []
        for tower, inputs, count in (
            (model.query_tower, lambda rows: data.query_inputs(rows, part), data.num_queries),
            (model.item_tower, data.item_inputs, data.num_items),
        ):
            rows = torch.arange(count, device=data.device)
            sides.append(torch.cat([tower(inputs(chunk)) for chunk in rows.split(batch_size)]))
    finally:
        model.train(was_training)
    return sides[0], sides[1]


def evaluate_model(
    model: TwoTower,
    data: TrainingExamples,
    part: str,
    ks: list[int] | tuple[int, ...],
    exclude_seen: bool = True,
    batch_size: int = 1024,
    groups: bool = True,
) -> dict[str, float]:
    """Exact full-corpus metrics of a model on ``valid`` or ``test`` of ``data.split``.

    Every item is embedded once, every query with the history known at that step;
    scores are (B, N) inner products of unit vectors (the temperature does not
    change a ranking). ``popularity@k`` counts what is known before the step (not
    reported for streamed data); ``groups``: the metrics by group too.
    """
    queries, items = embed_all(model, data, batch_size, part)

    def score(chunk: np.ndarray) -> torch.Tensor:
        return interest_scores(queries[torch.from_numpy(chunk).to(queries.device)], items)

    return evaluate(
        score,
        data.split,
        part,
        len(queries),
        len(items),
        ks=ks,
        exclude_seen=exclude_seen,
        chunk_size=batch_size,
        item_popularity=data.popularity,
        groups=groups,
    )


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
    per_query: QueryMetrics | None = None,
) -> dict[str, float]:
    """Exact full-corpus metrics of ``model`` on ``part`` of ``source``, by group too.

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
        per_query: where each evaluated query's metrics are kept (by query id), if given.

    Returns:
        ``{part}/{metric}@{k}``, ``popularity@k`` of the items known before the part,
        ``{part}/groups/...`` and ``{part}/queries``; with new items in the part
        (``split.new_items``), the same under ``{part}/new_items/``
        (``twotower.evaluation.ranking.evaluate_chunks``).
    """
    items = embed_rows(model.item_tower, pipeline, "item", source.items(), batch_size)
    chunks = source.held_out(part, pipeline, sample, seed)
    total = source.num_queries(part)
    popularity = source.popularity(part)
    with torch.no_grad():
        return evaluate_chunks(
            _embedded(model, chunks, items, source.query_key, batch_size),
            part,
            len(items),
            ks,
            exclude_seen,
            batch_size,
            popularity,
            total if sample is None else min(total, sample),
            item_counts=popularity,
            per_query=per_query,
            new_items=source.new_items(part),
        )


def _embedded(
    model: TwoTower,
    chunks: Iterator[QueryChunk],
    items: torch.Tensor,
    query_key: str,
    batch_size: int,
) -> Iterator[HeldOut]:
    """Each chunk's queries embedded from their raw rows and scored against ``items``,
    with their ids (the ``query_key`` column)."""
    device = items.device
    for chunk in chunks:
        assert chunk.queries is not None and chunk.pipeline is not None
        queries = embed_rows(model.query_tower, chunk.pipeline, "query", chunk.queries, batch_size)

        def score(rows: np.ndarray, queries: torch.Tensor = queries) -> torch.Tensor:
            return interest_scores(queries[torch.from_numpy(rows).to(device)], items)

        yield HeldOut(score, chunk.targets, chunk.seen, chunk.queries.column(query_key))
