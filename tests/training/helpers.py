"""What several training tests build by hand."""

from __future__ import annotations

import torch

from twotower.config import Config
from twotower.sources import open_source
from twotower.towers.model import TwoTower
from twotower.training.examples import EXAMPLES


def examples_and_model(config: Config):
    """``config``'s per-interaction training examples and a fresh model (seed 0) on
    them, for tests that call a loss or a trainer by hand."""
    source = open_source(config)
    features = source.fit_features(config, None)
    data = source.examples(EXAMPLES["interactions"], config, features, torch.device("cpu"))
    torch.manual_seed(0)
    return data, TwoTower.build(config.model, config.features, data.pipeline)
