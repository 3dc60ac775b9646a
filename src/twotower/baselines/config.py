"""The baselines' part of the config: each reference model's hyperparameters."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BaselinesConfig:
    """Hyperparameters of the reference models (choose them on validation).

    Attributes:
        ease_l2: EASE's L2 penalty on the item-item weights.
        itemknn_neighbors: how many most similar items item-KNN keeps per item.
        itemknn_shrink: added to item-KNN's cosine denominator.
    """

    ease_l2: float = 500.0
    itemknn_neighbors: int = 100
    itemknn_shrink: float = 0.0
