"""A trained model ranked against the whole corpus on a held-out part of its examples.

Every item is embedded once and every query with the history known at that step;
``twotower.evaluation.ranking.evaluate`` ranks them, seen items excluded.
"""

from __future__ import annotations

import numpy as np
import torch

from twotower.evaluation.ranking import evaluate
from twotower.towers.model import TwoTower, interest_scores
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
) -> dict[str, float]:
    """Exact full-corpus metrics of a model on ``valid`` or ``test`` of ``data.split``.

    Every item is embedded once, every query with the history known at that step;
    scores are (B, N) inner products of unit vectors (the temperature does not
    change a ranking). ``popularity@k`` counts what is known before the step (not
    reported for streamed data).
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
    )
