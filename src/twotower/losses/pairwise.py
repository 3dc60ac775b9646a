"""Pairwise losses: every (query, positive, negative) triplet asks the positive to win."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twotower.losses._inputs import checked_negative_mask, checked_weights


class TripletHinge(nn.Module):
    """Margin ranking loss: the positive's cosine must beat each negative's by ``margin``.

    Positive: the item the query interacted with; each kept negative forms one
    triplet (b, j) with it.

    Formula: ``mean over valid (b, j) of max(0, margin + neg_cos[b, j] - pos_cos[b])``;
    with ``weights``, triplet (b, j) weighs ``weights[b]``.

    Sampler: n negatives per query, drawn from the corpus (uniform or
    popularity^alpha, or mined hard negatives); ``neg_mask`` drops the draws that
    equal the positive.

    Siblings: ``TripletLogistic`` (the smooth version), ``PointwiseBCE``,
    ``ListwiseSoftmax``, ``SampledSoftmax``.

    Args:
        margin: how far, in cosine, the positive must lead; >= 0.
    """

    def __init__(self, margin: float = 0.5) -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = margin

    def forward(
        self,
        pos_cos: Tensor,
        neg_cos: Tensor,
        neg_mask: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        """Mean hinge over the valid triplets.

        Args:
            pos_cos: (B,) the cosine between each query and its positive.
            neg_cos: (B, n) the cosines between each query and its negatives.
            neg_mask: (B, n) bool, True = keep the triplet; None keeps them all.
            weights: (B,) non-negative weight of each query's triplets; None: alike.

        Returns:
            () the loss; 0 (still attached to the inputs) when no triplet is valid.
        """
        keep = checked_negative_mask(pos_cos, neg_cos, neg_mask, "pos_cos", "neg_cos")
        weights = checked_weights(weights, len(pos_cos))
        gap = _kept_gap(pos_cos, neg_cos, keep)  # (B, n) neg - pos
        return _mean_over_kept(F.relu(self.margin + gap), keep, weights)


class TripletLogistic(nn.Module):
    """Logistic (soft-margin) ranking loss: a smooth hinge that never stops pushing.

    Positive: the item the query interacted with; each kept negative forms one
    triplet (b, j) with it.

    Formula: ``mean over valid (b, j) of log(1 + exp(sigma * (neg_cos[b, j] - pos_cos[b])))``;
    with ``weights``, triplet (b, j) weighs ``weights[b]``.

    Sampler: n negatives per query, drawn from the corpus (uniform or
    popularity^alpha, or mined hard negatives); ``neg_mask`` drops the draws that
    equal the positive.

    Siblings: ``TripletHinge`` (the margin version), ``PointwiseBCE``,
    ``ListwiseSoftmax``, ``SampledSoftmax``.

    Args:
        sigma: the slope applied to the cosine gap (an inverse temperature); > 0.
    """

    def __init__(self, sigma: float = 10.0) -> None:
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.sigma = sigma

    def forward(
        self,
        pos_cos: Tensor,
        neg_cos: Tensor,
        neg_mask: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        """Mean logistic loss over the valid triplets.

        Args:
            pos_cos: (B,) the cosine between each query and its positive.
            neg_cos: (B, n) the cosines between each query and its negatives.
            neg_mask: (B, n) bool, True = keep the triplet; None keeps them all.
            weights: (B,) non-negative weight of each query's triplets; None: alike.

        Returns:
            () the loss; 0 (still attached to the inputs) when no triplet is valid.
        """
        keep = checked_negative_mask(pos_cos, neg_cos, neg_mask, "pos_cos", "neg_cos")
        weights = checked_weights(weights, len(pos_cos))
        gap = _kept_gap(pos_cos, neg_cos, keep)  # (B, n) neg - pos
        # softplus(x) = log(1 + exp(x)) without overflow for a large gap.
        return _mean_over_kept(F.softplus(self.sigma * gap), keep, weights)


def _kept_gap(pos_cos: Tensor, neg_cos: Tensor, keep: Tensor) -> Tensor:
    """(B, n) neg_cos - pos_cos, with masked slots set to 0 so that inf or NaN there stay out."""
    neg_cos = torch.where(keep, neg_cos, torch.zeros_like(neg_cos))
    return neg_cos - pos_cos[:, None]


def _mean_over_kept(per_triplet: Tensor, keep: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean of ``per_triplet`` over the kept slots (each row's weighted by ``weights``);
    a sum of zeros when none is kept.

    Dividing by at least 1 (or a tiny weight sum) instead of branching returns an exact
    0 that is still connected to the inputs, so ``backward`` works on a batch with no
    valid triplet.
    """
    kept = torch.where(keep, per_triplet, torch.zeros_like(per_triplet))
    if weights is None:
        return kept.sum() / keep.sum().clamp(min=1)
    return (weights[:, None] * kept).sum() / (weights[:, None] * keep).sum().clamp(min=1e-12)
