"""Sampled softmax over one candidate set shared by the whole batch."""

from __future__ import annotations

import torch
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


class MultiPositiveSoftmax(nn.Module):
    """Softmax cross-entropy of several positives per query over one candidate set.

    Row b of ``logits`` scores one query against every candidate; positive p is column
    ``labels[p]`` of row ``owners[p]``. Each positive's term is ``-log softmax`` of its
    score among the candidates its row does not ``exclude`` (the other positives of the
    same query, say), itself always included:

        term_p = logsumexp({s[o_p, j] : j not excluded in row o_p} + {s[o_p, l_p]}) - s[o_p, l_p]

    Formula: the mean of ``term_p`` over the P positives, or its ``weights``-weighted
    mean. Equal to ``SampledSoftmax`` on rows repeated once per positive
    (``logits[owners]``, ``labels``, with the excluded columns set to -inf), at the cost
    of one (B, M) matrix instead of (P, M).

    Siblings: ``SampledSoftmax`` (one positive per row).
    """

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        owners: Tensor,
        exclude: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        """Mean cross-entropy of each positive.

        Args:
            logits: (B, M) scaled cosines of every query against every candidate.
            labels: (P,) int64, the column of each positive.
            owners: (P,) int64, the row of each positive.
            exclude: (B, M) bool, True where a candidate is left out of the row's
                softmax (a positive's own column always counts), or None.
            weights: (P,) non-negative weight of each positive; None weighs them alike.

        Returns:
            () the loss; 0, still attached to ``logits``, when there are no positives.
        """
        terms = self.terms(logits, labels, owners, exclude)
        if not len(terms):
            return logits.sum() * 0.0
        return self.mean(terms, weights)

    def terms(
        self, logits: Tensor, labels: Tensor, owners: Tensor, exclude: Tensor | None = None
    ) -> Tensor:
        """(P,) each positive's ``term_p``; ``forward``'s arguments, its mean aside. The
        full softmax scores a few rows at a time with it (``FullSoftmax.chunk_rows``)."""
        if logits.ndim != 2 or labels.ndim != 1 or owners.shape != labels.shape:
            raise ValueError(
                f"need (B, M) logits and labels and owners of one shape (P,), got "
                f"{tuple(logits.shape)}, {tuple(labels.shape)}, {tuple(owners.shape)}"
            )
        if not len(labels):
            return logits.new_zeros(0)
        for name, values, size in (
            ("labels", labels, logits.shape[1]),
            ("owners", owners, len(logits)),
        ):
            if values.dtype != torch.int64 or bool(((values < 0) | (values >= size)).any()):
                raise ValueError(
                    f"{name} must be int64 in [0, {size}), got {values.dtype} from "
                    f"{int(values.min())} to {int(values.max())}"
                )
        scores = logits[owners, labels]  # (P,)
        if exclude is None:
            return torch.logsumexp(logits, dim=1)[owners] - scores
        if exclude.shape != logits.shape or exclude.dtype != torch.bool:
            raise ValueError(
                f"exclude must be a bool tensor of shape {tuple(logits.shape)}, "
                f"got {exclude.dtype} {tuple(exclude.shape)}"
            )
        others = torch.logsumexp(logits.masked_fill(exclude, -torch.inf), dim=1)
        others = others[owners]  # its own column is counted once, excluded or not
        normalizer = torch.where(exclude[owners, labels], torch.logaddexp(scores, others), others)
        return normalizer - scores

    @staticmethod
    def mean(terms: Tensor, weights: Tensor | None = None) -> Tensor:
        """The mean of (P,) ``terms``, or their ``weights``-weighted mean (P,)."""
        weights = checked_weights(weights, len(terms))
        return terms.mean() if weights is None else weighted_mean(terms, weights)
