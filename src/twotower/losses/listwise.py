"""Listwise loss: each query's positive against its own list of sampled negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twotower.losses._inputs import checked_negative_mask, checked_weights, weighted_mean


class ListwiseSoftmax(nn.Module):
    """Softmax cross-entropy over ``[positive, negatives]``, one list per query.

    Positive: the item the query interacted with, always at position 0 of its list;
    the query's kept negatives fill the rest. Unlike ``SampledSoftmax`` no candidate
    is shared between rows.

    Formula: ``mean over b of -log softmax([pos_logits[b], neg_logits[b, kept]])[0]``,
    or its ``weights``-weighted mean.

    Sampler: n negatives per query, drawn from the corpus (uniform or
    popularity^alpha, or mined hard negatives); ``neg_mask`` drops the draws that
    equal the positive.

    Siblings: ``SampledSoftmax`` (shared in-batch or mixed candidates),
    ``PointwiseBCE``, ``TripletHinge``, ``TripletLogistic``.
    """

    def forward(
        self,
        pos_logits: Tensor,
        neg_logits: Tensor,
        neg_mask: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        """Mean over queries of the positive's negative log-probability in its list.

        Args:
            pos_logits: (B,) each positive's logit, a cosine divided by a temperature.
            neg_logits: (B, n) the logits of each query's negatives.
            neg_mask: (B, n) bool, True = keep the negative; None keeps them all.
            weights: (B,) non-negative weight of each query's list; None: alike.

        Returns:
            () the loss, averaged over the B queries (weighted by ``weights``).
        """
        keep = checked_negative_mask(pos_logits, neg_logits, neg_mask, "pos_logits", "neg_logits")
        weights = checked_weights(weights, len(pos_logits))
        # -inf removes a negative from the softmax; the positive is never masked, so
        # every row keeps one finite entry and its log-probability stays finite.
        neg_logits = torch.where(keep, neg_logits, torch.full_like(neg_logits, float("-inf")))
        logits = torch.cat([pos_logits[:, None], neg_logits], dim=1)  # (B, 1 + n)
        labels = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
        if weights is None:
            return F.cross_entropy(logits, labels)
        return weighted_mean(F.cross_entropy(logits, labels, reduction="none"), weights)
