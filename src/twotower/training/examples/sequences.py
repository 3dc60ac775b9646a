"""``training.examples: sequences``: every prefix of a query's history at once (SASRec).

Each query's training items, oldest first, are cut into windows of ``max_len + 1``
items that overlap by one: items 1 .. n - 1 are each the target of exactly one
position. Position t of a window sees the window's items up to t (the causal history
encoder guarantees it) and predicts item t + 1, so one forward pass of the sequence
encoder gives ``max_len`` training examples where per-interaction training runs it
once per example. A target's history is the items of its own window before it: at
most ``max_len``, as at evaluation time, but fewer after a window's start.

    query q's items (oldest first):  a b c d e f g      max_len = 3
    windows:                         a b c d | d e f g
    positions -> targets:            a->b, ab->c, abc->d | d->e, de->f, def->g

With the ``full`` objective every position is scored against the whole corpus
(SASRec's cross-entropy, Klenitskiy and Vasilev 2023); its ``mask_seen`` leaves out of
a position's softmax the query's items before the target (with ``def->g``: a to f),
the window's and the earlier windows' alike, as evaluation leaves out seen items.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from twotower.data.dataset import Dataset
from twotower.data.splits import Split
from twotower.data.stream import shard_bounds
from twotower.errors import ConfigError
from twotower.features.pipeline import FeaturePipeline
from twotower.features.specs import HistoryFeature
from twotower.towers.history.order import reversed_real
from twotower.towers.model import TwoTower
from twotower.training.config import TrainingConfig
from twotower.training.distributed import Collective
from twotower.training.examples.base import Batch, item_embedder, with_id_dropout
from twotower.training.examples.interactions import RowOptions, TrainingData
from twotower.training.full_softmax import SeenItems

if TYPE_CHECKING:
    from typing_extensions import Unpack

SEQUENCE_ENCODERS = ("transformer", "gru")


@dataclasses.dataclass(kw_only=True)
class SequenceBatch(Batch):
    """One batch of windows: B rows of a query's items, P positions that have a target.

    Attributes:
        query: feature name -> the windows' query inputs, (B, ...), the window itself
            (most recent first) as the sequence-encoded history.
        positives: (P,) the targets of the real positions, window by window, oldest
            first: position t's target is the window's item t + 1.
        weights: (P,) each position's weight in the loss, or None: all alike.
        queries: (P,) each position's query index.
        seen: with ``mask_seen``, (S,) positions and (S,) items: every item each
            position's query interacted with before its target; None otherwise.
    """

    seen: SeenItems | None = None


class SequenceTrainingData(TrainingData):
    """``TrainingData`` whose batches are windows of each query's history, trained in one
    pass; evaluation is unchanged. Implements ``TrainingExamples``.

    Args:
        dataset, split, pipeline: as for ``TrainingData``.
        position_weights: ``query``: a query's positions share one weight (1 / its
            targets); ``position``: every position weighs 1.
        mask_seen: give each batch the items every position's query interacted with
            before its target (``SequenceBatch.seen``), which the ``full`` objective
            leaves out of that position's softmax (``FullConfig.mask_seen``).
        options: ``device``, ``weights``, ``weight_cap``, as for ``TrainingData``: each
            position's weight is then also its target interaction's weight.

    Raises:
        ConfigError: the query side has no history feature with a sequence encoder, or
            more than one history feature.
    """

    def __init__(
        self,
        dataset: Dataset,
        split: Split,
        pipeline: FeaturePipeline,
        position_weights: Literal["query", "position"] = "query",
        mask_seen: bool = False,
        **options: Unpack[RowOptions],
    ) -> None:
        super().__init__(dataset, split, pipeline, "before_event", **options)
        self.spec = _sequence_feature(self.history_features)
        self.mask_seen = mask_seen
        rows, window_query = self._windows(self.spec.max_len)  # (W, max_len + 1), (W,)
        self.window_query = window_query
        self.window_rows = rows  # training rows, -1 pads
        windows = torch.where(rows >= 0, self.item_idx[rows.clamp(min=0)], -1)
        self.window_items = windows
        targets = (windows[:, 1:] >= 0).sum(dim=1)  # (W,)
        per_query = torch.zeros(dataset.num_queries, dtype=torch.float32, device=self.device)
        per_query.index_add_(0, window_query, targets.to(torch.float32))
        self.window_weight = (
            1.0 / per_query[window_query]
            if position_weights == "query"
            else torch.ones(len(windows), device=self.device)
        )
        self.num_targets = int(targets.sum())

    @staticmethod
    def config_arguments(training: TrainingConfig) -> tuple:
        """The constructor's arguments after ``pipeline`` that a training config gives
        (``device``, ``weights`` and ``weight_cap`` aside)."""
        return (training.position_weights, getattr(training.objective, "mask_seen", False))

    def __len__(self) -> int:
        """Training positions (targets) in one epoch."""
        return self.num_targets

    def windows_per_batch(self, batch_size: int) -> int:
        """Windows in a batch: about ``batch_size`` positions."""
        return max(1, batch_size // self.spec.max_len)

    def steps(self, batch_size: int, world: int) -> int:
        """Optimizer steps in one epoch: global batches of windows."""
        return -(-len(self.window_items) // (self.windows_per_batch(batch_size) * world))

    def batches(
        self, batch_size: int, generator: torch.Generator, collective: Collective | None = None
    ) -> Iterator[SequenceBatch]:
        """One epoch of shuffled windows, every window once; with W processes each rank
        takes its contiguous share of every global batch (as ``TrainingData.batches``)."""
        collective = collective or Collective()
        world, rank = collective.world_size, collective.rank
        per_batch = self.windows_per_batch(batch_size) * world
        permutation = torch.randperm(len(self.window_items), generator=generator)
        permutation = permutation.to(self.device)
        for start in range(0, len(permutation), per_batch):
            rows = permutation[start : start + per_batch]
            bounds = shard_bounds(len(rows), world)
            yield self.window_batch(rows[bounds[rank] : bounds[rank + 1]])

    def window_batch(self, windows: torch.Tensor) -> SequenceBatch:
        """The batch of (B,) windows: each one's query inputs with its window as history
        (most recent first), and the (P,) targets of its positions, oldest first."""
        items = self.window_items[windows]  # (B, max_len + 1) item indices, -1 pads
        inputs, targets = items[:, :-1], items[:, 1:]  # (B, max_len) each
        real = targets >= 0  # a position is real where it has a target
        codes = torch.where(inputs >= 0, self.items[self.spec.item_feature][inputs.clamp(0)], 0)
        query = self.query_inputs(self.window_query[windows])
        query[self.spec.name] = reversed_real(codes, real.sum(dim=1))  # most recent first
        weights = self.window_weight[windows][:, None].expand_as(real)[real]  # (P,)
        if self.row_weights is not None:  # times each target interaction's own weight
            weights = weights * self.row_weights[self.window_rows[windows, 1:][real]]
        queries = self.window_query[windows][:, None].expand_as(real)[real]  # (P,)
        seen = self._seen(self.window_rows[windows, 1:][real]) if self.mask_seen else None
        return SequenceBatch(query, targets[real], weights=weights, queries=queries, seen=seen)

    def loss(
        self,
        model: TwoTower,
        objective: torch.nn.Module,
        batch: SequenceBatch,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The loss of a batch of windows: the sequence encoder's vector at every real
        position (one forward pass) against that position's target."""
        inputs = with_id_dropout(self, "query", batch.query, generator)
        query = model.query_tower.at_positions(inputs, self.spec.name)  # (P, D)
        # only the full softmax takes seen items (the config allows mask_seen there alone)
        seen = {} if batch.seen is None else {"seen": batch.seen}
        return objective(
            query,
            batch.positives,
            item_embedder(model, self, generator),
            model.scale(),
            generator,
            batch.weights,
            batch.queries,
            **seen,
        )

    def _seen(self, targets: torch.Tensor) -> SeenItems:
        """(S,) positions and (S,) items: for each of (P,) target training rows, the
        items of its query's training rows before it (oldest first)."""
        earlier = self._rank[targets]  # (P,) rows of the same query before each target
        first = self._position[targets] - earlier  # (P,) the query's first row in order
        at = torch.repeat_interleave(torch.arange(len(targets), device=self.device), earlier)
        within = torch.arange(len(at), device=self.device) - (earlier.cumsum(0) - earlier)[at]
        return at, self.item_idx[self._sequence_order[first[at] + within]]

    def _windows(self, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, max_len + 1) the training rows of every window, oldest first, -1
        padded; and (W,) each window's query."""
        order = self._sequence_order.cpu().numpy()  # training rows by query, oldest first
        query = self.query_idx.cpu().numpy()[order]
        firsts = np.flatnonzero(np.r_[True, query[1:] != query[:-1]]) if len(query) else []
        counts = np.diff(np.r_[firsts, len(query)]).astype(np.int64)
        per_query = np.where(counts > 1, -(-(counts - 1) // max_len), 0)  # windows of each
        owner = np.repeat(np.arange(len(counts)), per_query)  # (W,) index into firsts
        nth = np.arange(len(owner)) - np.repeat(np.cumsum(per_query) - per_query, per_query)
        starts = np.asarray(firsts, dtype=np.int64)[owner] + nth * max_len  # (W,)
        ends = np.asarray(firsts, dtype=np.int64)[owner] + counts[owner]  # (W,)
        position = starts[:, None] + np.arange(max_len + 1)  # (W, max_len + 1)
        inside = position < ends[:, None]
        rows = order[np.minimum(position, len(order) - 1)]
        rows = np.where(inside, rows, -1)
        window_query = query[np.asarray(firsts, dtype=np.int64)[owner]]
        return (
            torch.as_tensor(rows.reshape(-1, max_len + 1), device=self.device),
            torch.as_tensor(window_query, dtype=torch.int64, device=self.device),
        )


def _sequence_feature(features: list[HistoryFeature]) -> HistoryFeature:
    """The one history feature, which must have a sequence encoder and drop no items."""
    dropped = [spec.name for spec in features if spec.item_dropout > 0]
    if dropped:
        raise ConfigError(
            "training.examples=sequences trains every position of the history, so history "
            f"feature(s) {dropped} cannot drop items (set item_dropout: 0)"
        )
    if len(features) != 1 or features[0].encoder not in SEQUENCE_ENCODERS:
        encoders = {spec.name: spec.encoder for spec in features}
        raise ConfigError(
            "training.examples=sequences needs exactly one history feature, with a sequence "
            f"encoder ({' or '.join(SEQUENCE_ENCODERS)}); the query side has "
            f"{encoders or 'none'}"
        )
    return features[0]
