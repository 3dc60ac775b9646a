"""The fit loop: determinism, resume, early stopping, outputs, rebuilding from a run."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from twotower.config import Config, apply_overrides
from twotower.sources import load_data
from twotower.training.run import load_model, train_run
from twotower.training.trainer import build_optimizers


def with_training(config: Config, *overrides: str) -> Config:
    return apply_overrides(config, [f"training.{o}" for o in overrides])


def weights(run_dir, name="last") -> dict[str, torch.Tensor]:
    from twotower.training.checkpoint import CheckpointStore

    return CheckpointStore(run_dir / "checkpoints").load(name)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("objective", ["in_batch", "listwise"])
def test_resumed_run_equals_uninterrupted_run(small_config, tmp_path, objective):
    config = with_training(small_config, f"objective.kind={objective}", "epochs=3", "patience=0")
    config = apply_overrides(config, ["model.query.dropout=0.2"])  # dropout RNG matters too
    straight = train_run(config, tmp_path / "straight")
    interrupted = with_training(config, "epochs=1")
    train_run(interrupted, tmp_path / "resumed")
    resumed = train_run(config, tmp_path / "resumed", resume=True)
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))
    assert resumed.metrics == straight.metrics
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


HISTORY_VARIANTS = {
    "attention": ["encoder=attention", "dropout=0.2"],
    "transformer": ["encoder=transformer", "dropout=0.2"],
    "gru": ["encoder=gru", "dropout=0.2"],
    "self-attentive interests": ["interests=3", "extractor=self_attention"],
    "routed interests": ["interests=3", "extractor=routing"],
}


@pytest.mark.parametrize("variant", HISTORY_VARIANTS)
def test_resume_is_exact_for_each_history_encoder(small_config, tmp_path, variant):
    history = "features.query.history"
    config = apply_overrides(small_config, [f"{history}.{s}" for s in HISTORY_VARIANTS[variant]])
    config = with_training(config, "epochs=2", "patience=0")
    straight = train_run(config, tmp_path / "straight")
    train_run(with_training(config, "epochs=1"), tmp_path / "resumed")
    resumed = train_run(config, tmp_path / "resumed", resume=True)
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))
    assert resumed.metrics == straight.metrics


def test_same_seed_same_model_other_seed_other_model(small_config, tmp_path):
    config = with_training(small_config, "epochs=1")
    train_run(config, tmp_path / "a")
    train_run(config, tmp_path / "b")
    train_run(dataclasses.replace(config, seed=1), tmp_path / "c")
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    a, c = weights(tmp_path / "a"), weights(tmp_path / "c")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_early_stopping_keeps_the_best_epoch(small_config, tmp_path):
    # a learning rate this large makes validation worse after the first epochs
    config = with_training(small_config, "epochs=8", "patience=1", "lr=0.3")
    result = train_run(config, tmp_path)
    records = result.state.records
    values = [r["valid/ndcg@10"] for r in records]
    best = max(range(len(values)), key=values.__getitem__)
    assert result.state.best_epoch == best + 1
    assert result.state.stopped and len(records) == best + 2  # one epoch without progress
    assert result.metrics["valid/ndcg@10"] == pytest.approx(values[best])


def test_on_epoch_sees_each_validated_epoch_and_an_exception_stops_the_run(small_config, tmp_path):
    config = with_training(small_config, "epochs=3", "patience=0")
    seen = []

    class Stop(Exception):
        pass

    def on_epoch(epoch: int, record: dict) -> None:
        seen.append((epoch, record["epoch"], record["valid/ndcg@10"]))
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train_run(config, tmp_path, on_epoch=on_epoch)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # each epoch was validated, checkpointed and logged before the callback saw it
    assert seen == [(r["epoch"], r["epoch"], r["valid/ndcg@10"]) for r in logged]
    assert [epoch for epoch, _, _ in seen] == [1, 2]
    assert not (tmp_path / "metrics.json").exists()


def test_run_folder_has_config_logs_plot_metrics_and_rebuilds(small_config, tmp_path):
    config = with_training(small_config, "epochs=2", "tensorboard=true")
    result = train_run(config, tmp_path)
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "curves.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "features" / "features.json").is_file()
    assert any((tmp_path / "tensorboard").iterdir())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"valid/ndcg@10", "test/ndcg@10", "test/recall@10", "best_epoch"} <= metrics.keys()
    assert metrics == result.metrics

    loaded_config, pipeline, model = load_model(tmp_path)
    assert loaded_config == config
    dataset, _ = load_data(config)
    from twotower.towers.model import embed_rows

    rebuilt = embed_rows(model.item_tower, pipeline, "item", dataset.items)
    assert rebuilt.shape == (dataset.num_items, 64)
    assert torch.allclose(rebuilt.norm(dim=1), torch.ones(dataset.num_items), atol=1e-5)


def test_sparse_embeddings_train_with_a_sparse_optimizer(small_config, tmp_path):
    config = apply_overrides(
        with_training(small_config, "epochs=2", "sparse_optimizer=adagrad", "lr=0.05"),
        ["model.sparse_embeddings=true"],
    )
    result = train_run(config, tmp_path)
    assert result.metrics["valid/recall@10"] > 0.2  # popularity gets about 0.17 here
    _, pipeline, model = load_model(tmp_path)
    optimizers = build_optimizers(model, config.training)
    assert [type(o).__name__ for o in optimizers] == ["Adam", "Adagrad"]


@pytest.mark.parametrize(
    "objective", ["pointwise", "hinge", "logistic", "listwise", "in_batch", "mixed", "full"]
)
def test_a_multi_interest_tower_trains_with_every_objective(small_config, tmp_path, objective):
    """One step of each objective on a three-interest tower: a finite loss, and the
    extractor and the network learn from the interest each positive selected."""
    from twotower.features.pipeline import FeaturePipeline
    from twotower.towers.model import TwoTower
    from twotower.training.examples import TrainingData
    from twotower.training.trainer import RunPlan, Trainer

    config = apply_overrides(
        small_config,
        ["features.query.history.interests=3", f"training.objective.kind={objective}"],
    )
    dataset, split = load_data(config)
    pipeline = FeaturePipeline.fit(config.features, dataset, split.train)
    data = TrainingData(dataset, split, pipeline)
    torch.manual_seed(0)
    model = TwoTower.build(config.model, config.features, pipeline)
    trainer = Trainer(model, data, RunPlan(config.training), tmp_path, seed=0)
    batch = next(iter(data.batches(64, torch.Generator().manual_seed(0))))
    extractor = model.query_tower.encoders.encoders["history"]
    before = {n: p.detach().clone() for n, p in extractor.named_parameters() if n != "table.weight"}
    assert math.isfinite(trainer.train_step(batch))
    after = dict(extractor.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)


def test_epoch_learning_rates_by_hand():
    from twotower.training.config import TrainingConfig
    from twotower.training.trainer import epoch_lr

    cosine = TrainingConfig(lr=0.1, epochs=4, lr_schedule="cosine")
    expected = [
        0.1,
        0.05 * (1 + math.cos(math.pi / 4)),
        0.05,
        0.05 * (1 + math.cos(3 * math.pi / 4)),
    ]
    assert [epoch_lr(cosine, e, []) for e in (1, 2, 3, 4)] == pytest.approx(expected)
    # plateau: each earlier epoch that did not beat the best so far halves the rate
    plateau = TrainingConfig(lr=0.1, lr_schedule="plateau", metric="valid/ndcg@10")
    records = [{"valid/ndcg@10": v} for v in (0.1, 0.2, 0.15, 0.18, 0.25, 0.25)]
    rates = [epoch_lr(plateau, e, records) for e in range(1, 8)]
    assert rates == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.025, 0.025, 0.0125])
    assert epoch_lr(TrainingConfig(lr=0.1), 9, records) == 0.1
    with pytest.raises(ValueError, match="lr_factor"):
        TrainingConfig(lr_schedule="plateau", lr_factor=1.0)


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_a_scheduled_run_steps_at_its_rates_and_resumes_exactly(small_config, tmp_path, schedule):
    from twotower.training.trainer import epoch_lr

    config = with_training(small_config, "epochs=3", "patience=0", f"lr_schedule={schedule}")
    config = with_training(config, "lr=0.01", "lr_factor=0.1")
    straight = train_run(config, tmp_path / "straight")
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").open()]
    assert [r["lr"] for r in records] == [epoch_lr(config.training, e, records) for e in (1, 2, 3)]
    if schedule == "cosine":
        assert records[1]["lr"] == pytest.approx(0.01 * 0.75)
    train_run(with_training(config, "epochs=1"), tmp_path / "resumed")
    resumed = train_run(config, tmp_path / "resumed", resume=True)
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))
    assert resumed.metrics == straight.metrics


def test_an_unvalidated_run_logs_its_loss_and_no_metric(small_config, tmp_path, caplog):
    """A refit's plan (fixed learning rates, no validation) logs each epoch's loss and no
    validation metric (it once printed the epoch number as ``valid/ndcg@10``); a
    validated run logs the metric's value."""
    from twotower.features.pipeline import FeaturePipeline
    from twotower.towers.model import TwoTower
    from twotower.training.examples import TrainingData
    from twotower.training.trainer import RunPlan, Trainer

    config = with_training(small_config, "steps_per_epoch=2", "epochs=1")
    dataset, split = load_data(config)
    pipeline = FeaturePipeline.fit(config.features, dataset, split.train)
    data = TrainingData(dataset, split, pipeline)
    metric = config.training.metric

    def message(record: dict) -> str:  # what an epoch logs
        text = f"epoch {record['epoch']}: loss {record['loss']:.4f}"
        return f"{text}, {metric} {record[metric]:.4f}" if metric in record else text

    for name, plan in [
        ("refit", RunPlan(config.training, lrs=(0.01, 0.005))),
        ("validated", RunPlan(config.training)),
    ]:
        torch.manual_seed(0)
        model = TwoTower.build(config.model, config.features, pipeline)
        (tmp_path / name).mkdir()
        caplog.clear()
        with caplog.at_level("INFO", logger="twotower.training.trainer"):
            records = Trainer(model, data, plan, tmp_path / name, seed=0).fit().records
        logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch")]
        assert logged == [message(record) for record in records]
        validated = [metric in record for record in records]
        assert validated == [name == "validated"] * len(records)
        lrs = plan.lrs or (config.training.lr,)
        assert [record["lr"] for record in records] == list(lrs)
