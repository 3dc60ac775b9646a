"""The registry of example kinds: each ``training.examples`` builds its own examples,
whose batches the one trainer step turns into a loss; only interactions stream."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from twotower.config import Config, apply_overrides
from twotower.data.config import DataConfig, StreamConfig
from twotower.errors import ConfigError
from twotower.features.pipeline import FeaturePipeline
from twotower.sources import load_data
from twotower.towers.model import TwoTower
from twotower.training.config import FullConfig, InBatchConfig, TrainingConfig
from twotower.training.examples import (
    EXAMPLES,
    QueryTrainingData,
    SequenceTrainingData,
    TrainingData,
)
from twotower.training.trainer import RunPlan, Trainer

HISTORY = "features.query.history"
KINDS = {
    "interactions": (TrainingData, []),
    "queries": (QueryTrainingData, ["training.objective.kind=full"]),
    "sequences": (SequenceTrainingData, [f"{HISTORY}.encoder=gru"]),
}


def test_every_kind_of_examples_is_registered():
    assert sorted(EXAMPLES) == sorted(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_a_kind_builds_its_examples_and_the_trainer_steps_on_them(small_config, tmp_path, kind):
    cls, settings = KINDS[kind]
    config = apply_overrides(small_config, [*settings, f"training.examples={kind}"])
    dataset, split = load_data(config)
    pipeline = FeaturePipeline.fit(config.features, dataset, split.train)
    data = EXAMPLES[kind].from_split(config, dataset, split, pipeline, torch.device("cpu"))
    assert type(data) is cls and data.pipeline is pipeline
    torch.manual_seed(0)
    model = TwoTower.build(config.model, config.features, pipeline)
    trainer = Trainer(model, data, RunPlan(config.training), tmp_path, seed=0)
    batch = next(iter(data.batches(64, torch.Generator().manual_seed(0))))
    before = [p.detach().clone() for p in model.query_tower.parameters()]
    assert math.isfinite(trainer.train_step(batch))
    after = list(model.query_tower.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("kind", ["queries", "sequences"])
def test_only_interactions_are_streamed(kind):
    """Query-level and sequence examples gather each query's whole history: refused on a
    stream when the config is read, and by the builder itself."""
    stream = StreamConfig(train="t", valid="v", test="t", items="i")
    objective = FullConfig() if kind == "queries" else InBatchConfig()
    training = TrainingConfig(examples=kind, objective=objective)
    with pytest.raises(ValueError, match="which a stream does not hold"):
        Config(data=DataConfig(source="stream", stream=stream), training=training)
    config = Config(training=training)
    items, counts, cpu = pa.table({"item_id": ["a"]}), np.ones(1), torch.device("cpu")
    with pytest.raises(ConfigError, match="which a stream does not hold"):
        EXAMPLES[kind].from_stream(config, stream, None, items, counts, cpu)
