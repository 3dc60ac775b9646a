"""Shape checks shared by the losses and corrections; each error names the shape it expected."""

from __future__ import annotations

import torch
from torch import Tensor


def checked_negative_mask(
    pos: Tensor, neg: Tensor, neg_mask: Tensor | None, pos_name: str, neg_name: str
) -> Tensor:
    """Validates a (positives, negatives, mask) triple and returns the mask in full.

    Args:
        pos: (B,) one score per query.
        neg: (B, n) the scores of each query's negatives.
        neg_mask: (B, n) bool, True = keep, or None to keep every negative.
        pos_name: the name ``pos`` has in the caller's signature, for the message.
        neg_name: the name ``neg`` has in the caller's signature, for the message.

    Returns:
        (B, n) bool, ``neg_mask`` or all True.

    Raises:
        ValueError: a shape or dtype is not the one expected.
    """
    if pos.ndim != 1 or pos.shape[0] == 0:
        raise ValueError(f"{pos_name} must be (B,) with B >= 1, got {tuple(pos.shape)}")
    B = pos.shape[0]
    if neg.ndim != 2 or neg.shape[0] != B:
        raise ValueError(f"{neg_name} must be (B, n) with B={B}, got {tuple(neg.shape)}")
    if neg_mask is None:
        return torch.ones(neg.shape, dtype=torch.bool, device=neg.device)
    if neg_mask.shape != neg.shape or neg_mask.dtype != torch.bool:
        raise ValueError(
            f"neg_mask must be a bool tensor of shape {tuple(neg.shape)}, "
            f"got {neg_mask.dtype} {tuple(neg_mask.shape)}"
        )
    return neg_mask


def checked_weights(weights: Tensor | None, rows: int) -> Tensor | None:
    """Validates (B,) per-row loss weights: finite, non-negative, one per row.

    Raises:
        ValueError: the shape is not (B,), or a weight is negative or not finite.
    """
    if weights is None:
        return None
    if weights.shape != (rows,):
        raise ValueError(f"weights must be ({rows},), got {tuple(weights.shape)}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("weights must be finite and >= 0")
    return weights


def weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """sum(weights * values) / sum(weights), 0 (still attached) where the weights sum to 0."""
    return (values * weights).sum() / weights.sum().clamp(min=1e-12)


def check_logits_and_labels(logits: Tensor, labels: Tensor) -> None:
    """Validates (B, M) logits against (B,) int64 labels, each in [0, M).

    Raises:
        ValueError: a shape or dtype is wrong, or a label is out of range.
    """
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must be (B, M) with B, M >= 1, got {tuple(logits.shape)}")
    B, M = logits.shape
    if labels.shape != (B,) or labels.dtype != torch.int64:
        raise ValueError(
            f"labels must be int64 of shape ({B},), got {labels.dtype} {tuple(labels.shape)}"
        )
    # An out-of-range label would otherwise surface as an opaque device-side assert.
    if bool(((labels < 0) | (labels >= M)).any()):
        low, high = int(labels.min()), int(labels.max())
        raise ValueError(f"labels must lie in [0, {M}), got values from {low} to {high}")
