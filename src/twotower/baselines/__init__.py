"""Non-neural baselines that a two-tower model must beat, each ``fit`` then ``score``.

Each takes the (num_queries, N) binary train matrix in ``fit`` and maps query indices
(B,) to (B, N) float32 item scores in ``score``, so its bound ``score`` method is a
``score_fn`` for ``twotower.evaluation.ranking.evaluate``.
"""

from __future__ import annotations

from twotower.baselines.ease import EASE
from twotower.baselines.itemknn import ItemKNN
from twotower.baselines.popularity import Popularity

BASELINES: dict[str, type[Popularity | ItemKNN | EASE]] = {
    "pop": Popularity,
    "itemknn": ItemKNN,
    "ease": EASE,
}

__all__ = ["BASELINES", "EASE", "ItemKNN", "Popularity"]
