"""Sampled softmax over one candidate set shared by the whole batch."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from twotower.losses._inputs import check_logits_and_labels, checked_weights, weighted_mean


class SampledSoftmax(nn.Module):
    """Softmax cross-entropy of each query over a candidate set shared by the batch.

    Positive: column ``labels[b]`` of row b; every other column is a negative of that
    row. With in-batch negatives the candidates are the batch's own positives
    (``labels = arange(B)``); with mixed negatives, sampled corpus items are appended
    as extra columns.

    Formula: ``mean over b of -log softmax(logits[b])[labels[b]]``, or its
    ``weights``-weighted mean.

    Sampler: the in-batch sampler (candidates = the batch's positives) or the mixed
    sampler (in-batch plus items drawn from the corpus). The logits arrive already
    corrected, in a visible order chosen by the caller, with the functions in
    ``twotower.losses.corrections``: ``logq_correction`` for the sampling bias,
    ``mask_accidental_hits`` for duplicates of the positive (set to -inf), and
    optionally ``hardest_negatives``.

    Siblings: ``ListwiseSoftmax`` (per-query negatives), ``PointwiseBCE``,
    ``TripletHinge``, ``TripletLogistic``.
    """

    def forward(self, logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
        """Mean cross-entropy of each row's positive column.

        Args:
            logits: (B, M) scaled cosines of every query against every candidate; -inf
                removes an entry. The label column of each row must be finite.
            labels: (B,) int64, the column of row b's positive.
            weights: (B,) non-negative weight of each row; None weighs them alike.

        Returns:
            () the loss, averaged over the B queries (weighted by ``weights``).
        """
        check_logits_and_labels(logits, labels)
        weights = checked_weights(weights, len(labels))
        if weights is None:
            return F.cross_entropy(logits, labels)
        return weighted_mean(F.cross_entropy(logits, labels, reduction="none"), weights)
