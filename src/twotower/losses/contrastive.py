"""The contrastive loss between two views of the same items (self-supervised learning)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ViewContrastiveLoss(nn.Module):
    """InfoNCE between two views of a batch of items (Yao et al. 2021; SimCLR's loss,
    one direction).

    Positive: row i of ``second``, the other view of the same item as row i of
    ``first``; every other row j of ``second`` is a negative of row i (in-batch).

    Formula: ``mean over i of -log softmax_j(cos(first[i], second[j]) / temperature)[i]``.

    Sampler: none; the caller picks the items (the training batch's, or items drawn
    uniformly from the corpus) and makes the views (``twotower.towers.views``).

    Siblings: ``SampledSoftmax``, the same softmax between queries and items.

    Args:
        temperature: tau > 0; the smaller, the more the hardest negatives count.
    """

    def __init__(self, temperature: float) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, first: Tensor, second: Tensor) -> Tensor:
        """Mean cross-entropy of each item's other view among all items' other views.

        Args:
            first: (M, D) the first view of M items (normalized here: cosines).
            second: (M, D) the second view of the same M items, in the same order.

        Returns:
            () the loss; 0, still attached to the views, when M = 0.
        """
        if first.ndim != 2 or first.shape != second.shape:
            raise ValueError(
                f"need two views of one shape (M, D), got {tuple(first.shape)} "
                f"and {tuple(second.shape)}"
            )
        if not len(first):
            return (first.sum() + second.sum()) * 0.0
        logits = F.normalize(first, dim=1) @ F.normalize(second, dim=1).T  # (M, M)
        labels = torch.arange(len(first), device=first.device)
        return F.cross_entropy(logits / self.temperature, labels)
