"""Losses over scores, and the corrections applied to the scores before them.

- ``PointwiseBCE``: binary cross-entropy, positives label 1, sampled negatives label 0.
- ``TripletHinge``: mean of max(0, margin + neg_cos - pos_cos) over (query, pos, neg) triplets.
- ``TripletLogistic``: mean of log(1 + exp(sigma * (neg_cos - pos_cos))) over the triplets.
- ``ListwiseSoftmax``: softmax cross-entropy of the positive against its own negatives.
- ``SampledSoftmax``: softmax cross-entropy over candidates shared by the batch
  (in-batch or mixed negatives).
- ``MultiPositiveSoftmax``: the same with several positives per query row (query-level
  training with the full softmax).
- ``ViewContrastiveLoss``: InfoNCE between two views of the same items (a
  self-supervised term for the item tower, beside an objective's loss).
- ``corrections``: ``logq_correction``, ``mask_accidental_hits``,
  ``mask_known_positives``, ``hardest_negatives``
  and ``negative_mask``, applied by the caller in a visible order.

``LOSSES`` maps the names used in configs to the loss classes.
"""

from __future__ import annotations

from torch import nn

from twotower.losses.contrastive import ViewContrastiveLoss
from twotower.losses.corrections import (
    hardest_negatives,
    logq_correction,
    mask_accidental_hits,
    mask_known_positives,
    negative_mask,
)
from twotower.losses.in_batch import MultiPositiveSoftmax, SampledSoftmax
from twotower.losses.listwise import ListwiseSoftmax
from twotower.losses.pairwise import TripletHinge, TripletLogistic
from twotower.losses.pointwise import PointwiseBCE

# "in_batch" and "mixed" share one loss: they differ only in the candidates the
# sampler supplies, not in how they are scored.
LOSSES: dict[str, type[nn.Module]] = {
    "pointwise": PointwiseBCE,
    "hinge": TripletHinge,
    "logistic": TripletLogistic,
    "listwise": ListwiseSoftmax,
    "in_batch": SampledSoftmax,
    "mixed": SampledSoftmax,
}

__all__ = [
    "LOSSES",
    "ListwiseSoftmax",
    "MultiPositiveSoftmax",
    "PointwiseBCE",
    "SampledSoftmax",
    "TripletHinge",
    "TripletLogistic",
    "ViewContrastiveLoss",
    "hardest_negatives",
    "logq_correction",
    "mask_accidental_hits",
    "mask_known_positives",
    "negative_mask",
]
