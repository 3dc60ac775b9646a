"""A small synthetic dataset with planted clusters, written once per test session."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from twotower.config import Config
from twotower.demo import _write_synthetic, demo_config


@pytest.fixture(scope="session")
def small_config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The demo recipe shrunk to 600 queries and 300 items, training for a few seconds."""
    config = demo_config(
        [
            "data.synthetic.num_queries=600",
            "data.synthetic.num_items=300",
            "model.query.widths=[64]",
            "model.item.widths=[64]",
            "training.epochs=5",
            "training.batch_size=128",
            "training.tensorboard=false",
            "training.ks=[10]",
        ]
    )
    folder = Path(tmp_path_factory.mktemp("synthetic"))
    return dataclasses.replace(config, data=_write_synthetic(config, folder))
