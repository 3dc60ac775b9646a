"""Id dropout in training (``features.*.<id>.dropout``): the training loss reaches the
unknown-id row only with it, evaluation never drops, and a resumed run draws the same
masks as one never stopped."""

from __future__ import annotations

import torch

from tests.training.helpers import examples_and_model
from twotower.config import Config, apply_overrides
from twotower.features.transform import OOV
from twotower.training.evaluate import embed_all
from twotower.training.objectives import build_objective
from twotower.training.run import train_run

DROPPING = ["features.item.item_id.dropout=0.5", "features.query.user_id.dropout=0.5"]


def _unknown_rows_gradient(config: Config) -> dict[str, float]:
    """The norm of the gradient one training batch's loss sends each id table's
    unknown-id row (every id of the batch is known: the demo data has no rare id)."""
    data, model = examples_and_model(config)
    objective = build_objective(config.training.objective, data.item_counts())
    generator = torch.Generator().manual_seed(0)
    batch = next(data.batches(128, generator))
    data.loss(model, objective, batch, generator).backward()
    tables = {
        "user_id": model.query_tower.encoders.tables()["user_id"],
        "item_id": model.item_tower.encoders.tables()["item_id"],
    }
    return {name: float(table.weight.grad[OOV].norm()) for name, table in tables.items()}


def test_the_loss_reaches_the_unknown_row_only_with_dropout(small_config):
    assert _unknown_rows_gradient(small_config) == {"user_id": 0.0, "item_id": 0.0}
    dropped = _unknown_rows_gradient(apply_overrides(small_config, DROPPING))
    assert dropped["user_id"] > 0 and dropped["item_id"] > 0


def test_evaluation_never_drops(small_config):
    """The same weights embed every query and item bit-identically with or without
    dropout in the config, and twice alike: only the training loss drops."""
    data, model = examples_and_model(apply_overrides(small_config, DROPPING))
    plain, _ = examples_and_model(small_config)
    queries, items = embed_all(model, data, 1024)
    again = embed_all(model, data, 1024)
    without = embed_all(model, plain, 1024)
    for got in (again, without):
        assert torch.equal(got[0], queries) and torch.equal(got[1], items)


def test_resumed_run_with_id_dropout_equals_uninterrupted_run(small_config, tmp_path):
    from tests.training.test_trainer import assert_same_weights, weights

    config = apply_overrides(small_config, [*DROPPING, "training.epochs=2", "training.patience=0"])
    straight = train_run(config, tmp_path / "straight")
    train_run(apply_overrides(config, ["training.epochs=1"]), tmp_path / "resumed")
    resumed = train_run(config, tmp_path / "resumed", resume=True)
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))
    assert resumed.metrics == straight.metrics
    unlike = train_run(
        apply_overrides(config, ["features.item.item_id.dropout=0.0"]), tmp_path / "p0"
    )
    assert unlike.metrics != straight.metrics  # the dropout did change the training
