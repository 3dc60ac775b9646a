"""The self-supervised item term: its config checks, the items it picks, where its
gradient goes, and runs of every kind of examples with it on."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from twotower.config import apply_overrides
from twotower.errors import ConfigError
from twotower.features.pipeline import FeaturePipeline
from twotower.sources import load_data
from twotower.towers.model import TwoTower
from twotower.training.config import SelfSupervisedConfig
from twotower.training.examples import EXAMPLES
from twotower.training.self_supervised import ItemSelfSupervision, step_items
from twotower.training.trainer import RunPlan, Trainer

from .test_distributed import TORCHRUN, _train

SSL = "training.self_supervised"
ON = [f"{SSL}.weight=0.5", f"{SSL}.batch=64", f"{SSL}.dropout=0.1"]
HISTORY = "features.query.history"
KINDS = {
    "interactions": [],
    "queries": ["training.objective.kind=full"],
    "sequences": [f"{HISTORY}.encoder=gru"],
}


def built(config, kind: str = "interactions"):
    """The examples and a seeded model of ``config``."""
    config = apply_overrides(config, [*KINDS[kind], f"training.examples={kind}"])
    dataset, split = load_data(config)
    pipeline = FeaturePipeline.fit(config.features, dataset, split.train)
    data = EXAMPLES[kind].from_split(config, dataset, split, pipeline, torch.device("cpu"))
    torch.manual_seed(0)
    return config, data, TwoTower.build(config.model, config.features, pipeline)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("weight=-0.1", "weight must be >= 0"),
        ("temperature=0", "temperature must be > 0"),
        ("mask=1.5", r"mask must be a probability in \[0, 1\]"),
        ("dropout=1.0", r"dropout must be in \[0, 1\)"),
        ("batch=1", "batch must be >= 2"),
        ("items=popular", "is not one of"),
    ],
)
def test_bad_values_are_config_errors(small_config, setting, message):
    with pytest.raises(ConfigError, match=f"self_supervised.*{message}"):
        apply_overrides(small_config, [f"{SSL}.{setting}"])


def test_two_views_without_masking_or_dropout_are_refused(small_config):
    # any order of overrides reads: mask=0 first passes through mask = dropout = 0
    config = apply_overrides(
        small_config, [f"{SSL}.weight=0.1", f"{SSL}.mask=0", f"{SSL}.dropout=0.2"]
    )
    _, _, model = built(config)
    ItemSelfSupervision(config.training.self_supervised, model)
    with pytest.raises(ConfigError, match="mask and dropout are both 0"):
        ItemSelfSupervision(SelfSupervisedConfig(weight=0.1, mask=0.0), model)


def test_it_is_off_by_default(small_config, tmp_path):
    assert not small_config.training.self_supervised.on
    config, data, model = built(small_config)
    trainer = Trainer(model, data, RunPlan(config.training), tmp_path, seed=0)
    assert trainer.step_loss.self_supervision is None


def test_weight_0_trains_bit_for_bit_as_without_it(small_config, tmp_path):
    # its other settings, however set, neither draw from a generator nor touch a weight
    from twotower.training.run import train_run

    from .test_trainer import assert_same_weights, weights

    short = ["training.epochs=2", "training.patience=0", "training.steps_per_epoch=4"]
    plain = apply_overrides(small_config, short)
    idle = [f"{SSL}.weight=0", f"{SSL}.items=uniform", f"{SSL}.batch=64", f"{SSL}.dropout=0.3"]
    default = train_run(plain, tmp_path / "default")
    zero = train_run(apply_overrides(plain, idle), tmp_path / "zero")
    assert_same_weights(weights(tmp_path / "default"), weights(tmp_path / "zero"))
    assert zero.metrics == default.metrics
    on = train_run(apply_overrides(plain, ON), tmp_path / "on")  # and the term does count
    assert on.metrics != default.metrics


def test_masking_an_item_tower_of_one_feature_is_refused(small_config):
    features = dataclasses.replace(small_config.features, item=small_config.features.item[:1])
    config = dataclasses.replace(apply_overrides(small_config, ON), features=features)
    _, _, model = built(config)
    with pytest.raises(ConfigError, match=r"the item tower has one feature \('item_id'\)"):
        ItemSelfSupervision(config.training.self_supervised, model)
    ItemSelfSupervision(SelfSupervisedConfig(weight=0.1, mask=0.0, dropout=0.2), model)


def test_batch_items_are_the_distinct_positives_at_most_batch():
    config = SelfSupervisedConfig(weight=0.1, items="batch", batch=4)
    generator = torch.Generator().manual_seed(0)
    assert step_items(config, torch.tensor([5, 3, 5, 1]), 10, generator).tolist() == [1, 3, 5]
    picked = step_items(config, torch.tensor([9, 8, 7, 6, 5, 9, 8]), 10, generator)
    assert len(picked) == 4 and len(picked.unique()) == 4 and set(picked.tolist()) < {5, 6, 7, 8, 9}


@pytest.mark.parametrize("num_items", [100, 1_000_000])
def test_uniform_items_are_distinct_and_cover_the_corpus(num_items):
    config = SelfSupervisedConfig(weight=0.1, items="uniform", batch=50)
    generator = torch.Generator().manual_seed(0)
    draws = [step_items(config, torch.tensor([0, 0]), num_items, generator) for _ in range(40)]
    for picked in draws:
        assert len(picked.unique()) == len(picked) and len(picked) >= 45
        assert picked.min() >= 0 and picked.max() < num_items
    if num_items == 100:  # every item drawn, about alike
        counts = torch.bincount(torch.cat(draws), minlength=num_items)
        assert counts.min() > 5 and counts.max() < 35


def test_its_gradient_reaches_the_item_tower_alone(small_config):
    config, data, model = built(apply_overrides(small_config, ON))
    model.train()
    term = ItemSelfSupervision(config.training.self_supervised, model)
    batch = next(iter(data.batches(32, torch.Generator().manual_seed(0))))
    value = term(model, data, batch, torch.Generator().manual_seed(1))
    assert value.ndim == 0 and math.isfinite(value.item()) and value.item() > 0
    value.backward()
    item_params = {id(p) for p in model.item_tower.parameters()}
    touched = [p for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert touched and all(id(p) in item_params for p in touched)
    assert model.item_tower.network.layers[0].weight.grad.abs().sum() > 0
    # the item id table the query history shares is the item tower's own, so it learns
    assert model.item_tower.encoders.encoders["item_id"].table.weight.grad.abs().sum() > 0
    query_only = [p for p in model.query_tower.parameters() if id(p) not in item_params]
    assert query_only and all(p.grad is None for p in query_only)


def test_the_term_is_added_to_the_objectives_loss(small_config, tmp_path):
    config, data, model = built(apply_overrides(small_config, ON))
    batch = next(iter(data.batches(32, torch.Generator().manual_seed(0))))
    trainer = Trainer(model, data, RunPlan(config.training), tmp_path, seed=0)
    model.eval()  # no dropout: the same objective loss twice
    state = trainer.sampler_generator.get_state()
    total = trainer.step_loss(batch, trainer.sampler_generator)
    trainer.sampler_generator.set_state(state)
    alone = data.loss(model, trainer.objective, batch, trainer.sampler_generator)
    term = trainer.step_loss.self_supervision(model, data, batch, trainer.sampler_generator)
    assert total.item() == pytest.approx(alone.item() + term.item(), rel=1e-6)


@pytest.mark.parametrize("items", ["batch", "uniform"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_examples_trains_with_it(small_config, tmp_path, kind, items):
    config, data, model = built(apply_overrides(small_config, [*ON, f"{SSL}.items={items}"]), kind)
    trainer = Trainer(model, data, RunPlan(config.training), tmp_path, seed=0)
    assert isinstance(trainer.step_loss.self_supervision, ItemSelfSupervision)
    batch = next(iter(data.batches(64, torch.Generator().manual_seed(0))))
    before = [p.detach().clone() for p in model.item_tower.parameters()]
    assert math.isfinite(trainer.train_step(batch))
    after = list(model.item_tower.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_a_run_with_it_resumes_exactly(small_config, tmp_path):
    from twotower.training.run import train_run

    from .test_trainer import assert_same_weights, weights

    config = apply_overrides(
        small_config,
        [*ON, "training.epochs=2", "training.patience=0", "training.steps_per_epoch=4"],
    )
    straight = train_run(config, tmp_path / "straight")
    train_run(apply_overrides(config, ["training.epochs=1"]), tmp_path / "resumed")
    resumed = train_run(config, tmp_path / "resumed", resume=True)
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))
    assert resumed.metrics == straight.metrics


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_two_processes_train_with_it(tmp_path):
    # batch 64 on two ranks leaves rank 1 an empty share of the last step (no items)
    settings = [*ON, f"{SSL}.items=batch", "training.epochs=1", "training.batch_size=64"]
    _train(tmp_path / "two", settings, processes=2)
    (line,) = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert math.isfinite(json.loads(line)["loss"])
