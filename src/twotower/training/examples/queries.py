"""``training.examples: queries``: one example per query, its held-out items the positives.

Each epoch every query with training items is one example. Each of its training items
is held out with probability ``holdout``, independently and afresh every epoch: the
query's history input is its most recent ``max_len`` items that were kept, and every
held-out item is a positive, scored against the one query vector. So the tower runs
once per query instead of once per interaction, and an item never sees itself in its
own input (the rule per-interaction examples keep with ``mask_target``). This is the
held-out reconstruction of Mult-DAE (Liang et al. 2018) in a two-tower model; it suits
data whose order carries little, e.g. a random split, and is trained with the ``full``
softmax (every positive against the whole corpus, in one (B, N) score matrix).

    query q's items:   a b c d e f       holdout 0.5, one epoch's draw: b, e held out
    input (history):   f d c a           (most recent first, the kept items)
    positives:         b, e              (each: -log softmax over the corpus)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import torch

from twotower.data.dataset import Dataset
from twotower.data.splits import Split
from twotower.data.stream import shard_bounds
from twotower.errors import ConfigError
from twotower.features.pipeline import FeaturePipeline
from twotower.features.specs import HistoryFeature
from twotower.towers.model import TwoTower
from twotower.training.config import TrainingConfig
from twotower.training.distributed import Collective
from twotower.training.examples.base import Batch, item_embedder, with_id_dropout
from twotower.training.examples.interactions import RowOptions, TrainingData

if TYPE_CHECKING:
    from typing_extensions import Unpack

POOLING_ENCODERS = ("mean", "sum", "attention")


@dataclasses.dataclass(kw_only=True)
class QueryBatch(Batch):
    """One batch of queries: B query rows and P positives, held-out items of theirs.

    Attributes:
        query: feature name -> the B queries' inputs, (B, ...).
        positives: (P,) int64 item indices of the held-out items.
        owners: (P,) the query row each positive belongs to.
        weights: (P,) each positive's weight in the loss, or None: all alike.
        queries: (B,) each row's query index.
    """

    owners: torch.Tensor


class QueryTrainingData(TrainingData):
    """``TrainingData`` whose examples are queries: each batch row is one query, its
    input history the items kept this epoch, its positives the held-out ones.
    Evaluation is unchanged. Implements ``TrainingExamples``.

    Args:
        dataset, split, pipeline: as for ``TrainingData``.
        holdout: the probability that a training item is held out as a positive.
        position_weights: ``query``: a query's positives share one weight (1 / their
            number), so heavy users do not swamp light ones; ``position``: every
            positive weighs 1.
        options: ``device``, ``weights``, ``weight_cap``, as for ``TrainingData``: each
            positive's weight is then also its interaction's weight.

    Raises:
        ConfigError: the query side has no history feature, more than one, or one whose
            encoder is not a pooling one (a sequence encoder reads an order that held-out
            items break; time gaps and interests are not supported here).
    """

    def __init__(
        self,
        dataset: Dataset,
        split: Split,
        pipeline: FeaturePipeline,
        holdout: float = 0.5,
        position_weights: Literal["query", "position"] = "query",
        **options: Unpack[RowOptions],
    ) -> None:
        super().__init__(dataset, split, pipeline, "mask_target", **options)
        self.spec = _pooled_feature(self.history_features)
        self.holdout = holdout
        self.position_weights = position_weights
        order = self._sequence_order  # training rows by query, oldest first
        query = self.query_idx[order]
        counts = torch.bincount(query, minlength=self.num_queries)
        self.example_queries = torch.nonzero(counts).squeeze(1)  # (E,) queries with items
        self._counts = counts
        self._starts = torch.cumsum(counts, 0) - counts  # each query's first row in order
        self._newest_first = order.flip(0)  # rows by query (last first), newest first
        self._flipped_starts = len(order) - self._starts - counts

    @staticmethod
    def config_arguments(training: TrainingConfig) -> tuple:
        """The constructor's arguments after ``pipeline`` that a training config gives
        (``device``, ``weights`` and ``weight_cap`` aside)."""
        return (training.holdout, training.position_weights)

    def __len__(self) -> int:
        """Queries (examples) in one epoch."""
        return len(self.example_queries)

    def steps(self, batch_size: int, world: int) -> int:
        """Optimizer steps in one epoch: global batches of ``batch_size * world`` queries."""
        return -(-len(self) // (batch_size * world))

    def batches(
        self, batch_size: int, generator: torch.Generator, collective: Collective | None = None
    ) -> Iterator[QueryBatch]:
        """One epoch of shuffled query batches, each query once, its held-out items drawn
        from ``generator``; with W processes each rank takes its contiguous share of every
        global batch (as ``TrainingData.batches``), all ranks drawing the same items."""
        collective = collective or Collective()
        world, rank = collective.world_size, collective.rank
        permutation = torch.randperm(len(self), generator=generator).to(self.device)
        for start in range(0, len(self), batch_size * world):
            queries = self.example_queries[permutation[start : start + batch_size * world]]
            counts = self._counts[queries]
            held = torch.rand(int(counts.sum()), generator=generator).to(self.device)
            bounds = shard_bounds(len(queries), world)
            ends = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # items before row r
            first, last = int(ends[bounds[rank]]), int(ends[bounds[rank + 1]])
            mine = queries[bounds[rank] : bounds[rank + 1]]
            yield self.query_batch(mine, held[first:last] < self.holdout)

    def query_batch(self, queries: torch.Tensor, held: torch.Tensor) -> QueryBatch:
        """The batch of (B,) queries given (R,) whether each of their training items,
        query by query and newest first, is held out.

        Returns:
            A batch of B query rows whose history input is each query's kept items
            (the newest ``max_len``), with the (P,) held-out items as positives and
            ``owners`` (P,) the row each belongs to.
        """
        counts = self._counts[queries]  # (B,)
        owner = torch.repeat_interleave(torch.arange(len(queries), device=self.device), counts)
        within = torch.arange(len(owner), device=self.device) - (counts.cumsum(0) - counts)[owner]
        rows = self._newest_first[self._flipped_starts[queries][owner] + within]  # (R,)
        items = self.item_idx[rows]
        kept = ~held
        # each kept item's rank among its query's kept items, newest first
        kept_counts = torch.zeros(len(queries), dtype=torch.long, device=self.device)
        kept_counts.index_add_(0, owner, kept.long())
        rank = torch.cumsum(kept.long(), 0) - 1 - (kept_counts.cumsum(0) - kept_counts)[owner]
        width = self.spec.max_len
        slot = kept & (rank < width)
        codes = self.items[self.spec.item_feature][items]
        history = torch.zeros(len(queries), width, dtype=codes.dtype, device=self.device)
        history[owner[slot], rank[slot]] = codes[slot]
        query = self.query_inputs(queries)
        query[self.spec.name] = history
        positives, owners = items[held], owner[held]
        weights = None
        if self.position_weights == "query":
            per_row = torch.zeros(len(queries), device=self.device).index_add_(
                0, owners, torch.ones(len(owners), device=self.device)
            )
            weights = 1.0 / per_row[owners]
        if self.row_weights is not None:
            own = self.row_weights[rows[held]]
            weights = own if weights is None else weights * own
        return QueryBatch(query, positives, weights=weights, queries=queries, owners=owners)

    def loss(
        self,
        model: TwoTower,
        objective: torch.nn.Module,
        batch: QueryBatch,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The loss of a batch of queries: each query's vector against every one of its
        held-out items, from one score matrix (``objective.sets``: the full softmax)."""
        return objective.sets(
            model.query_tower(with_id_dropout(self, "query", batch.query, generator)),
            batch.positives,
            batch.owners,
            item_embedder(model, self, generator),
            model.scale(),
            batch.weights,
            batch.queries,
        )


def _pooled_feature(features: list[HistoryFeature]) -> HistoryFeature:
    """The one history feature, which must pool its items (no order, time or interests)."""
    if (
        len(features) != 1
        or features[0].encoder not in POOLING_ENCODERS
        or features[0].multi_interest
        or features[0].time_buckets
    ):
        found = {
            spec.name: spec.encoder
            + (f", interests {spec.interests}" if spec.multi_interest else "")
            + (f", time_buckets {spec.time_buckets}" if spec.time_buckets else "")
            for spec in features
        }
        raise ConfigError(
            "training.examples=queries builds each query's history from its kept items, so "
            "the query side needs exactly one history feature pooled without order, time "
            f"gaps or interests (encoder {' or '.join(POOLING_ENCODERS)}); it has "
            f"{found or 'none'}"
        )
    return features[0]
