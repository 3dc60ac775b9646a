"""``training.examples: interactions``: one example per training interaction.

In memory (``TrainingData``), or streamed from Parquet (``StreamingTrainingData``,
``stream.py``) when the data does not fit.

In memory, both sides' feature rows are transformed once with the fitted pipeline
(the same ``FeaturePipeline.transform`` serving calls) and kept as tensors; a batch
gathers the rows of its queries and items. No per-example Python runs in an epoch.

History features, for a training example (q, i), must not contain i itself, or
the model learns to find the target in its own input. Two rules:

    before_event  the query's training items strictly before this interaction,
                  most recent first (what a test-time history is: all earlier items)
    mask_target   the query's whole training history with the target removed
                  (for data without a meaningful order, e.g. a random split)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, TypedDict

import numpy as np
import pyarrow as pa
import torch

from twotower.data.dataset import ITEM_IDX, QUERY_IDX, TIMESTAMP, WEIGHT, Dataset
from twotower.data.splits import Split, recency_order
from twotower.data.stream import shard_bounds
from twotower.errors import DataError
from twotower.features.pipeline import FeaturePipeline
from twotower.features.specs import HistoryFeature
from twotower.towers.model import TwoTower
from twotower.training.config import HistoryRule, TrainingConfig, WeightRule
from twotower.training.distributed import Collective
from twotower.training.examples.base import Batch, interaction_weights, row_loss, to_device


class RowOptions(TypedDict, total=False):
    """What every in-memory kind of examples takes as ``TrainingData`` does."""

    device: torch.device | str
    weights: WeightRule
    weight_cap: float


class TrainingData:
    """The training interactions and both sides' model inputs, on one device.

    Implements ``TrainingExamples``.

    Args:
        dataset: the whole dataset (every query and item row).
        split: its training interactions are the examples (those of ``split.examples``
            where it marks a new period; the earlier ones still fill histories).
        pipeline: the fitted features.
        history: how history features avoid showing an example its own target;
            ``auto`` is ``before_event`` when interactions have timestamps.
        device: where tensors live.
        weights: how each interaction's ``weight`` weighs its example in the loss
            (``TrainingConfig.weights``); ``weight_cap`` for ``capped``.

    Raises:
        DataError: ``weights`` asks for a weight column the interactions lack, or a
            weight is negative or not a number.
    """

    popularity: Literal["known"] | None = "known"

    def __init__(
        self,
        dataset: Dataset,
        split: Split,
        pipeline: FeaturePipeline,
        history: HistoryRule = "auto",
        device: torch.device | str = "cpu",
        weights: WeightRule = "none",
        weight_cap: float = 5.0,
    ) -> None:
        self.device = torch.device(device)
        self.split, self.pipeline = split, pipeline
        self.num_queries = dataset.num_queries
        self.queries = to_device(pipeline.transform("query", dataset.queries), self.device)
        # At the test step a history also holds the validation interactions.
        seen_by_test = pa.concat_tables([split.train, split.valid], promote_options="default")
        test_pipeline = pipeline.with_histories(dataset, seen_by_test)
        self.test_queries = (
            self.queries
            if test_pipeline is pipeline
            else to_device(test_pipeline.transform("query", dataset.queries), self.device)
        )
        self.items = to_device(pipeline.transform("item", dataset.items), self.device)
        train = split.train
        query = train.column(QUERY_IDX).to_numpy()
        self.query_idx = torch.tensor(query, device=self.device)
        self.item_idx = torch.tensor(train.column(ITEM_IDX).to_numpy(), device=self.device)
        self.row_weights = _row_weights(train, weights, weight_cap, self.device)
        # the training rows that are examples; None: every one (no split.train_from)
        self.examples = None if split.examples is None else torch.tensor(split.examples)
        self.num_items = dataset.num_items
        if history == "auto":
            history = "before_event" if TIMESTAMP in train.column_names else "mask_target"
        self.history_rule = history
        self.history_features = [
            spec for spec in pipeline.config.query if isinstance(spec, HistoryFeature)
        ]
        timestamps = train.column(TIMESTAMP).to_numpy() if TIMESTAMP in train.column_names else None
        if timestamps is not None and any(s.time_buckets for s in self.history_features):
            self._times = torch.tensor(timestamps, dtype=torch.float64, device=self.device)
        self._index_recency(torch.from_numpy(recency_order(query, timestamps)).to(self.device))

    def _index_recency(self, order: torch.Tensor) -> None:
        """Keeps (rows,) the training rows by query, oldest first (``order``), each row's
        place in it and its count of earlier rows of its query."""
        self._sequence_order = order  # training rows, by query, oldest first
        self._position = torch.empty_like(order)
        self._position[order] = torch.arange(len(order), device=self.device)
        sorted_query = self.query_idx[order]
        first = torch.ones_like(sorted_query, dtype=torch.bool)
        first[1:] = sorted_query[1:] != sorted_query[:-1]
        starts = torch.cummax(
            torch.where(first, torch.arange(len(order), device=self.device), 0), 0
        )
        self._rank = torch.empty_like(order)  # each row's count of earlier rows of its query
        self._rank[order] = torch.arange(len(order), device=self.device) - starts.values

    @staticmethod
    def config_arguments(training: TrainingConfig) -> tuple:
        """The constructor's arguments after ``pipeline`` that a training config gives
        (``device``, ``weights`` and ``weight_cap`` aside)."""
        return (training.history,)

    def __len__(self) -> int:
        return len(self.query_idx) if self.examples is None else len(self.examples)

    def steps(self, batch_size: int, world: int) -> int:
        """Optimizer steps in one epoch: global batches of ``batch_size * world`` rows."""
        return -(-len(self) // (batch_size * world))

    def item_counts(self) -> np.ndarray:
        """(N,) training examples per item."""
        items = self.item_idx.cpu().numpy()
        if self.examples is not None:
            items = items[self.examples.numpy()]
        return np.bincount(items, minlength=self.num_items)

    def training_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows,) query and item indices of every training interaction (each query's
        known positives, examples or not)."""
        return self.query_idx, self.item_idx

    def item_inputs(self, items: torch.Tensor) -> dict[str, torch.Tensor]:
        """The item tower's inputs of (M,) item indices."""
        return {name: values[items] for name, values in self.items.items()}

    def query_inputs(self, queries: torch.Tensor, part: str = "train") -> dict[str, torch.Tensor]:
        """The query tower's inputs of (B,) query indices at a step.

        Histories hold what is known before ``part``: training interactions for
        ``train`` and ``valid``, training and validation ones for ``test``.
        """
        inputs = self.test_queries if part == "test" else self.queries
        return {name: values[queries] for name, values in inputs.items()}

    def batches(
        self, batch_size: int, generator: torch.Generator, collective: Collective | None = None
    ) -> Iterator[Batch]:
        """One epoch of shuffled batches; every training row exactly once.

        With W processes every rank draws the same permutation and cuts it into global
        batches of ``batch_size * W`` rows; a rank's batch is its contiguous share of
        each (sizes differ by at most one, so the last may be empty). The ranks' batches
        at a step together are the batch one process with ``batch_size * W`` would see.
        """
        collective = collective or Collective()
        world, rank = collective.world_size, collective.rank
        permutation = torch.randperm(len(self), generator=generator)
        if self.examples is not None:
            permutation = self.examples[permutation]
        permutation = permutation.to(self.device)
        for start in range(0, len(self), batch_size * world):
            rows = permutation[start : start + batch_size * world]
            bounds = shard_bounds(len(rows), world)
            yield self.batch(rows[bounds[rank] : bounds[rank + 1]])

    def batch(self, rows: torch.Tensor) -> Batch:
        """The examples of (B,) training rows, histories made safe for each target."""
        positives = self.item_idx[rows]
        query = self.query_inputs(self.query_idx[rows])
        for spec in self.history_features:
            history = query[spec.name]
            if self.history_rule == "before_event":
                query[spec.name] = self._history_before(rows, spec, history.shape[1])
                if spec.time_buckets:
                    query[spec.times_input] = self._times_before(rows, history.shape[1])
            else:  # the target's code blanked; its timestamp is then never read
                target = self.items[spec.item_feature][positives]  # (B,) the targets' codes
                query[spec.name] = history.masked_fill(history == target[:, None], 0)
        weights = None if self.row_weights is None else self.row_weights[rows]
        return Batch(query, positives, weights=weights, queries=self.query_idx[rows])

    def loss(
        self, model: TwoTower, objective: torch.nn.Module, batch: Batch, generator: torch.Generator
    ) -> torch.Tensor:
        """The loss of a batch of interactions: each row's query against its positive."""
        return row_loss(self, model, objective, batch, generator)

    def _history_before(self, rows: torch.Tensor, spec: HistoryFeature, width: int) -> torch.Tensor:
        """(B, width) item codes of each row's earlier interactions, most recent first."""
        earlier, source = self._earlier(rows, width)
        return torch.where(earlier, self.items[spec.item_feature][self.item_idx[source]], 0)

    def _times_before(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        """(B, width) float64 timestamps of ``_history_before``'s items (0 where none)."""
        earlier, source = self._earlier(rows, width)
        return torch.where(earlier, self._times[source], 0.0)

    def _earlier(self, rows: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, width) whether each row has a j-th earlier interaction of its query (j = 1:
        just before), and that interaction's training row (any row where it has none)."""
        back = torch.arange(1, width + 1, device=self.device)  # (L,)
        earlier = self._rank[rows, None] >= back  # (B, L) that many earlier rows exist
        position = (self._position[rows, None] - back).clamp(min=0)
        return earlier, self._sequence_order[position]


def _row_weights(
    train: pa.Table, rule: WeightRule, cap: float, device: torch.device
) -> torch.Tensor | None:
    """(rows,) float32 loss weights of the training interactions, or None for ``none``."""
    if rule == "none":
        return None
    if WEIGHT not in train.column_names:
        raise DataError(
            f"training.weights={rule!r} weighs each example by its interaction's weight, "
            "but the interactions have no weight column (name it in data.interactions)"
        )
    weights = interaction_weights(train.column(WEIGHT), rule, cap, "training interaction")
    return torch.tensor(weights, device=device)
