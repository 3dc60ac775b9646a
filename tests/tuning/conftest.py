"""A tiny synthetic dataset and config for tuning tests: a trial trains in seconds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from twotower.config import Config, save_config
from twotower.demo import _write_synthetic, demo_config

TINY = [
    "data.synthetic.num_queries=200",
    "data.synthetic.num_items=100",
    "data.synthetic.interactions_per_query=10",
    "model.query.widths=[32]",
    "model.item.widths=[32]",
    "training.epochs=2",
    "training.patience=0",
    "training.batch_size=64",
    "training.tensorboard=false",
    "training.ks=[10]",
    "threads=1",
]


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A YAML config reading 200 users' synthetic Parquet tables; 2 epochs, one thread."""
    folder = Path(tmp_path_factory.mktemp("tiny"))
    config = demo_config(TINY)
    config = dataclasses.replace(config, data=_write_synthetic(config, folder / "data"))
    save_config(config, folder / "config.yaml")
    return folder / "config.yaml"


@pytest.fixture(scope="session")
def tiny_config(tiny_config_path: Path) -> Config:
    from twotower.config import load_config

    return load_config(tiny_config_path)
