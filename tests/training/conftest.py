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


@pytest.fixture(scope="session")
def popularity_recall(small_config: Config) -> float:
    """Validation Recall@10 of the popularity ranking on ``small_config``'s data and
    split: what a run must clearly beat to have learned the planted clusters."""
    from twotower.baselines.popularity import Popularity
    from twotower.data.matrix import interaction_matrix
    from twotower.evaluation.ranking import evaluate
    from twotower.sources import load_data

    dataset, split = load_data(small_config)
    train = interaction_matrix(split.train, dataset.num_queries, dataset.num_items)
    score = Popularity().fit(train).score
    metrics = evaluate(score, split, "valid", dataset.num_queries, dataset.num_items, ks=[10])
    return metrics["valid/recall@10"]
