"""Two views of each item for a self-supervised loss (Yao et al. 2021, "Self-supervised
Learning for Large-scale Item Recommendations"): random feature masking, then dropout on
the input encodings, each view through the same item tower.

Masking draws one uniform u per (item, feature): the first view blanks the features
with u < p, the second those with u >= 1 - p (each feature's missing input, as its
encoder knows it: ``FeatureEncoders.blank``). Each view so blanks a feature with
probability p; for p <= 0.5 the two never blank the same feature, and at p = 0.5 they
blank complementary halves (the paper's masks). p = 0 leaves both views whole, p = 1
blanks every feature of both.
"""

from __future__ import annotations

import torch

from twotower.towers.model import Tower


def masked_views(
    tower: Tower, inputs: dict[str, torch.Tensor], mask: float, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model inputs of two views of each row, by random feature masking.

    Args:
        tower: the tower the inputs are for (its encoders know each missing input).
        inputs: model inputs of M rows.
        mask: p, the probability that a view blanks a feature of a row.
        generator: draws the masks (on the CPU, so a seeded run repeats them anywhere).

    Returns:
        The first and the second view's inputs, M rows each.
    """
    rows = len(next(iter(inputs.values())))
    u = torch.rand(rows, len(tower.encoders.encoders), generator=generator)  # (M, F)
    device = next(iter(inputs.values())).device
    first = tower.encoders.blank(inputs, (u < mask).to(device))
    second = tower.encoders.blank(inputs, (u >= 1.0 - mask).to(device))
    return first, second


def item_views(
    tower: Tower,
    inputs: dict[str, torch.Tensor],
    mask: float,
    dropout: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, D') and (M, D') unit vectors of two views of each of M items (``Tower.view``:
    no bias coordinate), both through ``tower`` in one pass.

    Args:
        tower: the item tower.
        inputs: the M items' model inputs.
        mask: the probability that a view blanks a feature of an item (``masked_views``).
        dropout: dropout on each view's concatenated encodings (in training mode).
        generator: draws the masks.
    """
    first, second = masked_views(tower, inputs, mask, generator)
    both = {name: torch.cat([first[name], second[name]]) for name in first}  # 2M rows
    vectors = tower.view(both, dropout)  # (2M, D')
    M = len(vectors) // 2
    return vectors[:M], vectors[M:]
