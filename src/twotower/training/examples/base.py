"""What every kind of training examples shares: the ``TrainingExamples`` protocol the
trainer and the evaluator read, the per-row ``Batch``, the loss of one example per row,
and the interactions' loss weights.

A kind of examples owns its batches and how a batch becomes a loss (its ``loss``
method), so the trainer runs any kind without asking which it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Literal, Protocol

import numpy as np
import pyarrow as pa
import torch

from twotower.data.splits import Split
from twotower.errors import DataError
from twotower.features.dropout import drop_ids, dropout_rates
from twotower.features.pipeline import FeaturePipeline
from twotower.towers.model import TwoTower, select_interests
from twotower.training.distributed import Collective
from twotower.training.full_softmax import EmbedItems, embed_unique


@dataclasses.dataclass
class Batch:
    """One batch of training examples, one positive per row (an interaction each);
    ``QueryBatch`` and ``SequenceBatch`` say how theirs differ.

    Attributes:
        query: feature name -> the batch's query inputs, (B, ...).
        positives: (B,) int64 item indices of the interacted items.
        weights: (B,) each example's weight in the loss, or None: all alike.
        queries: (B,) each example's query index (masking a query's other known
            positives reads it), or None where unknown.
    """

    query: dict[str, torch.Tensor]
    positives: torch.Tensor
    weights: torch.Tensor | None = None
    queries: torch.Tensor | None = None


class TrainingExamples(Protocol):
    """What the trainer and the evaluator read of training data: each kind of
    ``twotower.training.examples`` offers it.

    Attributes:
        device: where batches and inputs live.
        pipeline: the fitted features the inputs come from.
        num_items: N, the corpus size.
        num_queries: the query rows ``query_inputs`` indexes (all queries, or the
            evaluation sample of a stream).
        split: the held-out parts ranked by evaluation, indexed by those query rows
            (and the training interactions, to exclude seen items).
        popularity: what ``popularity@k`` counts when evaluating: ``"known"`` (the
            interactions known before the part), or None (not reported).
    """

    device: torch.device
    pipeline: FeaturePipeline
    num_items: int
    num_queries: int
    split: Split
    popularity: Literal["known"] | None

    def __len__(self) -> int:
        """Training examples in one epoch."""
        ...

    def steps(self, batch_size: int, world: int) -> int:
        """Optimizer steps in one epoch of ``batches``."""
        ...

    def item_counts(self) -> np.ndarray:
        """(N,) training interactions per item (popularity sampling, logQ)."""
        ...

    def training_pairs(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows,) query and item indices of every training interaction, or None where
        they are not all at hand (a stream)."""
        ...

    def item_inputs(self, items: torch.Tensor) -> dict[str, torch.Tensor]:
        """The item tower's inputs of (M,) item indices."""
        ...

    def query_inputs(self, queries: torch.Tensor, part: str = "train") -> dict[str, torch.Tensor]:
        """The query tower's inputs of (B,) query rows, with histories as of ``part``."""
        ...

    def batches(
        self, batch_size: int, generator: torch.Generator, collective: Collective | None = None
    ) -> Iterator[Batch]:
        """One epoch of shuffled batches, this process's share of each global batch."""
        ...

    def loss(
        self, model: TwoTower, objective: torch.nn.Module, batch: Batch, generator: torch.Generator
    ) -> torch.Tensor:
        """The training loss of one of this kind's batches (a scalar, graph attached)."""
        ...


def item_embedder(
    model: TwoTower, data: TrainingExamples, generator: torch.Generator
) -> EmbedItems:
    """(M,) item indices -> (M, D) vectors, through the item tower on ``data``'s inputs,
    the item ids' dropout applied (``with_id_dropout``): for the training loss alone."""
    return lambda items: model.item_tower(
        with_id_dropout(data, "item", data.item_inputs(items), generator)
    )


def with_id_dropout(
    data: TrainingExamples, side: str, inputs: dict[str, torch.Tensor], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """A training batch's inputs of one side, each of its id features with ``dropout``
    read as out of vocabulary at that rate (``twotower.features.dropout``); the inputs
    themselves where no feature of the side drops."""
    rates = dropout_rates(getattr(data.pipeline.config, side))
    return drop_ids(inputs, rates, generator)


def row_loss(
    data: TrainingExamples,
    model: TwoTower,
    objective: torch.nn.Module,
    batch: Batch,
    generator: torch.Generator,
) -> torch.Tensor:
    """The loss of a batch of one example per row: each row's query vector against its
    positive. A multi-interest tower scores each positive by the interest closest to it."""
    embed_items = item_embedder(model, data, generator)
    tower = model.query_tower
    inputs = with_id_dropout(data, "query", batch.query, generator)
    if tower.interests == 1:
        query = tower(inputs)  # (B, D)
    else:
        with torch.no_grad():
            targets = embed_unique(batch.positives, embed_items)  # (B, D)
        query = select_interests(tower(inputs), targets)  # (B, K, D) -> (B, D)
    return objective(
        query,
        batch.positives,
        embed_items,
        model.scale(),
        generator,
        batch.weights,
        batch.queries,
    )


def interaction_weights(
    column: pa.ChunkedArray | pa.Array, rule: str, cap: float, where: str
) -> np.ndarray:
    """(rows,) float32 loss weights of raw interaction weights under ``rule``
    (``raw``, ``log1p``, ``capped``; see ``TrainingConfig.weights``).

    Raises:
        DataError: a weight is negative, missing or not a number; ``where`` names the rows.
    """
    raw = np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)
    bad = ~np.isfinite(raw) | (raw < 0)
    if bad.any():
        raise DataError(
            f"training.weights={rule!r}: {int(bad.sum())} {where} weight(s) are "
            f"negative or not a number (the first: {raw[bad][0]})"
        )
    weights = {"raw": raw, "log1p": np.log1p(raw), "capped": np.minimum(raw, cap)}[rule]
    return weights.astype(np.float32)


def to_device(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The same inputs, each tensor on ``device``."""
    return {name: tensor.to(device) for name, tensor in inputs.items()}
