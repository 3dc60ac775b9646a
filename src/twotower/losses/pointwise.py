"""Pointwise loss: each (query, item) pair is classified on its own as clicked or not."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twotower.losses._inputs import checked_negative_mask, checked_weights


class PointwiseBCE(nn.Module):
    """Binary cross-entropy over the positives (label 1) and their sampled negatives (label 0).

    Positive: the item the query interacted with; each kept negative is one more
    example with label 0, so a query's negatives are not compared with its positive
    directly, unlike the pairwise and listwise losses.

    Formula: ``mean over the B positives and the valid negatives of
    -[y log sigmoid(s) + (1 - y) log(1 - sigmoid(s))]``, s a scaled cosine; with
    ``weights``, each row's positive and negatives weighted by its weight.

    Sampler: n negatives per query, drawn from the corpus (uniform or
    popularity^alpha); ``neg_mask`` drops the draws that equal the positive.

    Siblings: ``TripletHinge`` and ``TripletLogistic`` (pairwise),
    ``ListwiseSoftmax`` (listwise over the same samples), ``SampledSoftmax``
    (shared in-batch or mixed candidates).
    """

    def forward(
        self,
        pos_logits: Tensor,
        neg_logits: Tensor,
        neg_mask: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        """Mean binary cross-entropy over every valid example.

        Args:
            pos_logits: (B,) each positive's logit, a cosine divided by a temperature.
            neg_logits: (B, n) the logits of each query's negatives.
            neg_mask: (B, n) bool, True = keep the negative; None keeps them all.
            weights: (B,) non-negative weight of each row (its positive and its
                negatives); None weighs them alike.

        Returns:
            () the loss, averaged over the B positives and the kept negatives
            (a weighted mean with ``weights``).
        """
        keep = checked_negative_mask(pos_logits, neg_logits, neg_mask, "pos_logits", "neg_logits")
        weights = checked_weights(weights, len(pos_logits))
        # Masked slots may hold anything (inf, NaN); replacing them before the loss keeps
        # both the value and the gradient clean, where a multiply by 0 would not.
        neg_logits = torch.where(keep, neg_logits, torch.zeros_like(neg_logits))
        pos_loss = F.binary_cross_entropy_with_logits(
            pos_logits, torch.ones_like(pos_logits), reduction="sum"
        )
        neg_loss = F.binary_cross_entropy_with_logits(
            neg_logits, torch.zeros_like(neg_logits), reduction="none"
        )
        neg_loss = torch.where(keep, neg_loss, torch.zeros_like(neg_loss))
        if weights is None:
            return (pos_loss + neg_loss.sum()) / (pos_logits.shape[0] + keep.sum())
        pos_loss = F.binary_cross_entropy_with_logits(
            pos_logits, torch.ones_like(pos_logits), reduction="none"
        )
        total = (weights * pos_loss).sum() + (weights[:, None] * neg_loss).sum()
        count = weights.sum() + (weights[:, None] * keep).sum()
        return total / count.clamp(min=1e-12)
