"""The self-supervised item term (``training.self_supervised``): which items make the
views each step, and their contrastive loss, weighted, beside the objective's.

    items (the batch's, or uniform over the corpus) -> their item-tower inputs
      -> two views (``twotower.towers.views``) -> ViewContrastiveLoss * weight
"""

from __future__ import annotations

import torch

from twotower.errors import ConfigError
from twotower.losses import ViewContrastiveLoss
from twotower.towers.model import TwoTower
from twotower.towers.views import item_views
from twotower.training.config import SelfSupervisedConfig
from twotower.training.examples.base import Batch, TrainingExamples


class ItemSelfSupervision(torch.nn.Module):
    """The weighted self-supervised loss of one training step (Yao et al. 2021).

    Args:
        config: ``training.self_supervised`` (its weight > 0).
        model: the model trained; its item tower is checked for what masking needs.

    Raises:
        ConfigError: neither masking nor dropout (two identical views); feature
            masking on an item tower of one feature, whose masked view would hold
            nothing of the item.
    """

    def __init__(self, config: SelfSupervisedConfig, model: TwoTower) -> None:
        super().__init__()
        features = list(model.item_tower.encoders.encoders)
        if config.mask == 0 and config.dropout == 0:
            # checked here, not as the config is read: --set mask=0 then dropout=0.2
            # passes through mask = dropout = 0 on the way
            raise ConfigError(
                "training.self_supervised: mask and dropout are both 0, so the two views "
                "of an item would be the same; set mask (feature masking) or dropout"
            )
        if config.mask > 0 and len(features) == 1:
            raise ConfigError(
                f"training.self_supervised.mask={config.mask}: the item tower has one "
                f"feature ({features[0]!r}), so a masked view would hold nothing of its "
                "item; set mask: 0 and use dropout, or give the items more features"
            )
        self.config = config
        self.loss = ViewContrastiveLoss(config.temperature)

    def forward(
        self,
        model: TwoTower,
        data: TrainingExamples,
        batch: Batch,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """() ``weight`` times the contrastive loss of this step's items' two views."""
        items = step_items(self.config, batch.positives, data.num_items, generator)
        items = items.to(data.device)
        first, second = item_views(
            model.item_tower,
            data.item_inputs(items),
            self.config.mask,
            self.config.dropout,
            generator,
        )
        return self.config.weight * self.loss(first, second)


def step_items(
    config: SelfSupervisedConfig,
    positives: torch.Tensor,
    num_items: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """(M,) distinct item indices on the CPU, M <= ``config.batch``: the batch's
    positives (a random subset of them when there are more; ``items: batch``), or drawn
    uniformly from the N items (``items: uniform``)."""
    count = config.batch
    if config.items == "batch":
        distinct = positives.unique().cpu()
        if len(distinct) <= count:
            return distinct
        return distinct[torch.randperm(len(distinct), generator=generator)[:count]]
    if num_items <= 16 * count:
        return torch.randperm(num_items, generator=generator)[:count]
    # a large corpus: draws seldom repeat (count / 32 expected); the repeats are dropped
    return torch.randint(num_items, (count,), generator=generator).unique()
