"""Training objectives: which negatives each positive meets, and which loss scores them.

An objective pairs a sampler with a loss. It gets the batch's query vectors and
positive item ids, draws negatives, embeds every distinct item once through the
one item tower, and hands scores (never the model) to the loss:

    pointwise  per-row negatives (uniform or popularity^alpha), BCE on scaled cosines
    hinge      per-row negatives, triplet max(0, m + cos- - cos+)
    logistic   per-row negatives, triplet log(1 + exp(sigma (cos- - cos+)))
    listwise   per-row negatives, softmax over [pos, negs] of scaled cosines
    in_batch   the batch's positives are everyone's candidates; logQ, hit masking
    mixed      in-batch plus corpus items sampled uniformly, one softmax
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import nn

from twotower.losses import (
    ListwiseSoftmax,
    PointwiseBCE,
    SampledSoftmax,
    TripletHinge,
    TripletLogistic,
    hardest_negatives,
    logq_correction,
    mask_accidental_hits,
    negative_mask,
)
from twotower.sampling import (
    FREQUENCIES,
    SAMPLERS,
    InBatchSampler,
    MixedSampler,
)
from twotower.training.distributed import Collective

SamplerName = Literal["uniform", "popularity"]
FrequencyName = Literal["counts", "streaming", "none"]

# (M,) item indices -> (M, D) item vectors, through the item tower.
EmbedItems = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class SampledNegatives:
    """Per-row negatives: ``uniform`` over the corpus or ``popularity`` (count^alpha)."""

    sampler: SamplerName = "uniform"
    alpha: float = 0.75

    def __post_init__(self) -> None:
        counts = {k: v for k, v in vars(self).items() if k in ("neg_per_pos", "num_negatives")}
        if self.alpha < 0 or any(v < 1 for v in counts.values()):
            raise ValueError(f"need alpha >= 0 and at least one negative, got {vars(self)}")


@dataclasses.dataclass(frozen=True)
class PointwiseConfig(SampledNegatives):
    """Each positive with ``neg_per_pos`` sampled negatives; binary cross-entropy."""

    kind: Literal["pointwise"] = "pointwise"
    neg_per_pos: int = 2


@dataclasses.dataclass(frozen=True)
class HingeConfig(SampledNegatives):
    """Triplets (q, i+, i-) with ``num_negatives`` negatives per positive; hinge with margin."""

    kind: Literal["hinge"] = "hinge"
    margin: float = 0.5
    num_negatives: int = 4


@dataclasses.dataclass(frozen=True)
class LogisticConfig(SampledNegatives):
    """Triplets with a logistic (soft) hinge of sharpness ``sigma``."""

    kind: Literal["logistic"] = "logistic"
    sigma: float = 10.0
    num_negatives: int = 4


@dataclasses.dataclass(frozen=True)
class ListwiseConfig(SampledNegatives):
    """One positive and ``num_negatives`` sampled negatives in one softmax."""

    kind: Literal["listwise"] = "listwise"
    num_negatives: int = 16


@dataclasses.dataclass(frozen=True)
class SoftmaxCorrections:
    """The corrections of the shared-candidate softmax objectives.

    Attributes:
        logq: the sampling-probability estimate subtracted from the logits:
            ``counts`` (training counts), ``streaming`` (Yi et al. 2019) or ``none``.
        mask_hits: mask a candidate equal to the row's positive (the item twice).
        hard_negatives: if > 0, keep only this many highest-scoring negatives per row.
        streaming_buckets: hash buckets of the streaming frequency estimate.
    """

    logq: FrequencyName = "counts"
    mask_hits: bool = True
    hard_negatives: int = 0
    streaming_buckets: int = 1 << 20

    def __post_init__(self) -> None:
        if self.hard_negatives < 0 or self.streaming_buckets < 1:
            raise ValueError("need hard_negatives >= 0 and streaming_buckets >= 1")


@dataclasses.dataclass(frozen=True)
class InBatchConfig(SoftmaxCorrections):
    """In-batch softmax: the batch's positives are every row's candidates."""

    kind: Literal["in_batch"] = "in_batch"


@dataclasses.dataclass(frozen=True)
class MixedConfig(SoftmaxCorrections):
    """In-batch plus ``num_sampled`` uniformly drawn corpus items (Yang et al. 2020)."""

    kind: Literal["mixed"] = "mixed"
    num_sampled: int = 512


ObjectiveConfig = (
    PointwiseConfig | HingeConfig | LogisticConfig | ListwiseConfig | InBatchConfig | MixedConfig
)


class RowNegatives(nn.Module):
    """Objectives with per-row sampled negatives: pointwise, hinge, logistic, listwise.

    Args:
        loss: takes (B,) positive and (B, n) negative scores and a (B, n) mask.
        sampler: draws (B, n) negatives per positive.
        num_negatives: n.
        scaled: the loss takes cosines divided by the temperature (BCE, softmax),
            rather than raw cosines (triplet losses, whose margin is in cosine units).
    """

    def __init__(self, loss: nn.Module, sampler, num_negatives: int, scaled: bool) -> None:
        super().__init__()
        self.loss = loss
        self.sampler = sampler
        self.num_negatives = num_negatives
        self.scaled = scaled

    def forward(
        self,
        query: torch.Tensor,
        positives: torch.Tensor,
        embed_items: EmbedItems,
        scale: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The loss of (B, D) query vectors against their (B,) positive items."""
        if not len(positives):  # a rank's empty share of a global batch: 0, graph kept
            return query.sum() + embed_items(positives).sum()
        negatives = self.sampler.sample(positives.cpu(), self.num_negatives, generator)
        negatives = negatives.to(positives.device)  # (B, n)
        items = embed_unique(torch.cat([positives, negatives.flatten()]), embed_items)
        pos_items, neg_items = items[: len(positives)], items[len(positives) :]
        pos = (query * pos_items).sum(-1)  # (B,)
        neg = torch.einsum("bd,bnd->bn", query, neg_items.view(*negatives.shape, -1))  # (B, n)
        if self.scaled:
            pos, neg = pos * scale, neg * scale
        return self.loss(pos, neg, negative_mask(positives, negatives))


class SharedCandidates(nn.Module):
    """Softmax over candidates shared by the batch: in-batch, or in-batch + sampled.

    Corrections run in this order: logQ, accidental-hit masking, hard negatives.
    """

    def __init__(
        self, sampler, frequency, logq: bool, mask_hits: bool, hard_negatives: int
    ) -> None:
        super().__init__()
        self.loss = SampledSoftmax()
        self.sampler = sampler
        self.frequency = frequency
        self.logq = logq
        self.mask_hits = mask_hits
        self.hard_negatives = hard_negatives
        self.step = 0
        self.collective = Collective()  # the trainer sets the process group's, if any

    def forward(
        self,
        query: torch.Tensor,
        positives: torch.Tensor,
        embed_items: EmbedItems,
        scale: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The loss of (B, D) query vectors against their (B,) positive items."""
        self.step += 1
        device = positives.device
        # with several processes every rank's positives are candidates (the global batch)
        everyone, offset = self.collective.gather_ids(positives)  # (G,), this rank's start
        self.frequency.update(everyone.cpu(), self.step)
        candidates, log_q = self.sampler.candidates(everyone.cpu(), generator)  # (M,)
        candidates, log_q = candidates.to(device), log_q.to(device)
        if self.collective.distributed:
            # a rank embeds its own positives; sampled extras are the same on every rank
            # (one sampler seed), so each rank embeds them itself
            vectors = self.collective.gather_rows(embed_unique(positives, embed_items))
            if len(candidates) > len(everyone):
                extra = embed_unique(candidates[len(everyone) :], embed_items)
                vectors = torch.cat([vectors, extra])  # (M, D)
        else:
            vectors = embed_unique(candidates, embed_items)
        logits = query @ vectors.T * scale  # (B, M)
        if not len(positives):  # a rank's empty share of a global batch: 0, graph kept
            return logits.sum()
        labels = offset + torch.arange(len(positives), device=device)  # positives come first
        if self.logq:
            logits = logq_correction(logits, log_q)
        if self.mask_hits:
            logits = mask_accidental_hits(logits, labels, positives, candidates)
        if self.hard_negatives:
            logits, labels = hardest_negatives(logits, labels, self.hard_negatives)
        return self.loss(logits, labels)

    def get_extra_state(self) -> dict:
        """The step count and frequency estimate, saved in checkpoints for resuming."""
        return {"step": self.step, "frequency": self.frequency.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self.frequency.load_state_dict(state["frequency"])


def embed_unique(items: torch.Tensor, embed_items: EmbedItems) -> torch.Tensor:
    """(M, D) vectors of (M,) item ids, running each distinct item through the tower once."""
    unique, inverse = torch.unique(items, return_inverse=True)
    return embed_items(unique).index_select(0, inverse)


def build_objective(config: ObjectiveConfig, counts: np.ndarray) -> nn.Module:
    """The objective a config names.

    Args:
        config: one of the objective configs.
        counts: (N,) training interactions per item (popularity sampling, logQ).
    """
    num_items = len(counts)
    if isinstance(config, (InBatchConfig, MixedConfig)):
        frequency = _frequency(config, counts)
        if isinstance(config, InBatchConfig):
            sampler = InBatchSampler(frequency)
        else:
            sampler = MixedSampler(frequency, num_items, config.num_sampled)
        return SharedCandidates(
            sampler, frequency, config.logq != "none", config.mask_hits, config.hard_negatives
        )
    if config.sampler == "popularity":
        sampler = SAMPLERS["popularity"](counts, config.alpha)
    else:
        sampler = SAMPLERS["uniform"](num_items)
    if isinstance(config, PointwiseConfig):
        return RowNegatives(PointwiseBCE(), sampler, config.neg_per_pos, scaled=True)
    if isinstance(config, HingeConfig):
        return RowNegatives(TripletHinge(config.margin), sampler, config.num_negatives, False)
    if isinstance(config, LogisticConfig):
        return RowNegatives(TripletLogistic(config.sigma), sampler, config.num_negatives, False)
    return RowNegatives(ListwiseSoftmax(), sampler, config.num_negatives, scaled=True)


def _frequency(config: InBatchConfig | MixedConfig, counts: np.ndarray):
    if config.logq == "streaming":
        return FREQUENCIES["streaming"](num_buckets=config.streaming_buckets)
    # "none" still needs an estimate for the mixed sampler's bookkeeping; it is unused.
    return FREQUENCIES["counts"](counts)
