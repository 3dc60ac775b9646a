"""Score corrections applied to (B, M) logits before ``SampledSoftmax``, one function each.

Each function is pure (it returns a new tensor and leaves its input alone), so the
caller chains them in a visible order, typically::

    logits = logq_correction(logits, log_q)
    logits = mask_accidental_hits(logits, labels, positive_ids, candidate_ids)
    logits = mask_known_positives(logits, labels, known)  # optional
    logits, labels = hardest_negatives(logits, labels, num=32)  # optional
    loss = SampledSoftmax()(logits, labels)

``negative_mask`` plays the part of ``mask_accidental_hits`` for the losses that take
per-query negatives (``neg_mask`` of the pointwise, pairwise and listwise losses).
"""

from __future__ import annotations

import torch
from torch import Tensor

from twotower.losses._inputs import check_logits_and_labels


def logq_correction(logits: Tensor, log_q: Tensor) -> Tensor:
    """Subtracts the log of each candidate's sampling probability from its logits.

    A sampled softmax sees popular items as negatives far more often than the full
    softmax it stands in for, so without a correction the model learns to push
    popular items down. Subtracting log q(j), the log-probability that candidate j is
    sampled (for in-batch negatives: the item's share of the training interactions),
    makes the sampled loss an unbiased estimate of the full one (the sampling-bias
    correction of Yi et al., RecSys 2019). It applies to every column, the positive
    included; -inf entries stay -inf.

    Args:
        logits: (B, M) scores of each query against the M candidates.
        log_q: (M,) log sampling probability of each candidate, or (B, M) where it
            differs by row (candidates drawn for each row besides the shared ones).

    Returns:
        (B, M) ``logits - log_q`` (broadcast over the rows for a (M,) ``log_q``).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, M), got {tuple(logits.shape)}")
    if log_q.ndim == 2 and log_q.shape != logits.shape:
        raise ValueError(f"a (B, M) log_q must be {tuple(logits.shape)}, got {tuple(log_q.shape)}")
    if log_q.ndim != 2 and log_q.shape != (logits.shape[1],):
        raise ValueError(f"log_q must be (M,) with M={logits.shape[1]}, got {tuple(log_q.shape)}")
    return logits - log_q


def mask_accidental_hits(
    logits: Tensor, labels: Tensor, positive_ids: Tensor, candidate_ids: Tensor
) -> Tensor:
    """Sets to -inf each candidate that is the row's own positive item in another column.

    The same item can appear more than once among the candidates: twice in a batch,
    or drawn from the corpus as a mixed negative. In a column other than ``labels[b]``
    it would count as a negative of row b while being that row's positive, so it is
    removed from row b's softmax. The label column itself is never masked.

    Args:
        logits: (B, M) scores of each query against the M candidates.
        labels: (B,) int64, the column of row b's positive.
        positive_ids: (B,) int64, the item id of row b's positive.
        candidate_ids: (M,) int64, the item id of each candidate column.

    Returns:
        (B, M) a copy of ``logits`` with the accidental hits set to -inf.
    """
    check_logits_and_labels(logits, labels)
    B, M = logits.shape
    if positive_ids.shape != (B,):
        raise ValueError(f"positive_ids must be (B,) with B={B}, got {tuple(positive_ids.shape)}")
    if candidate_ids.shape != (M,):
        raise ValueError(f"candidate_ids must be (M,) with M={M}, got {tuple(candidate_ids.shape)}")
    same_item = candidate_ids[None, :] == positive_ids[:, None]  # (B, M)
    columns = torch.arange(M, device=logits.device)
    hits = same_item & (columns[None, :] != labels[:, None])
    return logits.masked_fill(hits, float("-inf"))


def mask_known_positives(logits: Tensor, labels: Tensor, known: Tensor) -> Tensor:
    """Sets to -inf each candidate that is another training positive of the row's query.

    A user who watched ten films is a row ten times; in-batch, the other nine can sit
    in the same batch as candidates, where the softmax would push them down as
    negatives of the user who liked them. Masking them (beside the accidental hits,
    which only catch the row's own item) keeps a query's positives from competing.

    Args:
        logits: (B, M) scores of each query against the M candidates.
        labels: (B,) int64, the column of row b's positive (never masked).
        known: (B, M) bool, True where candidate j is a training positive of row b's
            query.

    Returns:
        (B, M) a copy of ``logits`` with those candidates set to -inf.
    """
    check_logits_and_labels(logits, labels)
    if known.shape != logits.shape or known.dtype != torch.bool:
        raise ValueError(
            f"known must be a bool tensor of shape {tuple(logits.shape)}, "
            f"got {known.dtype} {tuple(known.shape)}"
        )
    columns = torch.arange(logits.shape[1], device=logits.device)
    return logits.masked_fill(known & (columns[None, :] != labels[:, None]), float("-inf"))


def hardest_negatives(logits: Tensor, labels: Tensor, num: int) -> tuple[Tensor, Tensor]:
    """Keeps each row's positive and its ``num`` highest-scoring negatives.

    Hard-negative mining: the negatives the model already ranks far below the
    positive add almost nothing to the softmax, so dropping them focuses the loss on
    the confusable ones. Entries masked to -inf may be kept when a row has fewer than
    ``num`` finite negatives; they still add nothing to the softmax.

    Args:
        logits: (B, M) scores of each query against the M candidates.
        labels: (B,) int64, the column of row b's positive.
        num: how many negatives to keep per row, >= 1; all M - 1 if it is larger.

    Returns:
        ``(kept, new_labels)``: kept (B, 1 + min(num, M - 1)) with the positive in
        column 0 and the negatives after it in descending order; new_labels (B,) zeros.
    """
    check_logits_and_labels(logits, labels)
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    B, M = logits.shape
    positives = logits.gather(1, labels[:, None])  # (B, 1)
    # Row b's negative columns are 0..M-1 without labels[b]: shift each index at or
    # past the label up by one.
    slots = torch.arange(M - 1, device=logits.device).expand(B, M - 1)
    negative_columns = slots + (slots >= labels[:, None]).long()  # (B, M - 1)
    negatives = logits.gather(1, negative_columns)
    hardest = negatives.topk(min(num, M - 1), dim=1, sorted=True).values
    new_labels = torch.zeros(B, dtype=torch.int64, device=logits.device)
    return torch.cat([positives, hardest], dim=1), new_labels


def negative_mask(positive_ids: Tensor, negative_ids: Tensor) -> Tensor:
    """True where a sampled negative is a different item from the row's positive.

    Args:
        positive_ids: (B,) the item id of each row's positive.
        negative_ids: (B, n) the item ids of each row's sampled negatives.

    Returns:
        (B, n) bool, usable as ``neg_mask`` (True = keep).
    """
    if positive_ids.ndim != 1:
        raise ValueError(f"positive_ids must be (B,), got {tuple(positive_ids.shape)}")
    B = positive_ids.shape[0]
    if negative_ids.ndim != 2 or negative_ids.shape[0] != B:
        raise ValueError(f"negative_ids must be (B, n) with B={B}, got {tuple(negative_ids.shape)}")
    return negative_ids != positive_ids[:, None]
