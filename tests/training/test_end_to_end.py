"""Every objective learns the planted clusters: after a short training, validation
recall@10 beats the popularity ranking by a clear margin."""

from __future__ import annotations

import dataclasses

import pytest

from twotower.features.specs import FeaturesConfig, HistoryFeature, IdFeature
from twotower.training.config import (
    FullConfig,
    HingeConfig,
    InBatchConfig,
    ListwiseConfig,
    LogisticConfig,
    MixedConfig,
    PointwiseConfig,
)
from twotower.training.run import train_run

OBJECTIVES = {
    "pointwise": PointwiseConfig(num_negatives=3),
    "hinge": HingeConfig(margin=0.5),
    "logistic": LogisticConfig(sigma=10.0),
    "listwise": ListwiseConfig(num_negatives=16),
    "in_batch": InBatchConfig(logq="counts"),
    "in_batch_streaming": InBatchConfig(logq="streaming", streaming_buckets=1024),
    "mixed": MixedConfig(num_sampled=64),
    "mixed_mask_known": MixedConfig(num_sampled=64, mask_known=True),
    "full": FullConfig(),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_beats_popularity(name, small_config, popularity_recall, tmp_path):
    training = dataclasses.replace(small_config.training, objective=OBJECTIVES[name])
    result = train_run(dataclasses.replace(small_config, training=training), tmp_path)
    recall = result.metrics["valid/recall@10"]
    assert recall > 1.5 * popularity_recall, (name, recall, popularity_recall)


def test_ids_and_history_alone_need_no_feature_tables(small_config, popularity_recall, tmp_path):
    """A query side of id + history and an item side of id only read nothing but the
    interactions file: no user or item table is configured, and the run still learns."""
    data = dataclasses.replace(small_config.data, queries=None, items=None)
    features = FeaturesConfig(
        query=[
            IdFeature(name="user_id", column="user_id", dim=32),
            HistoryFeature(name="history", column="user_id", item_feature="item_id"),
        ],
        item=[IdFeature(name="item_id", column="item_id", dim=32)],
    )
    training = dataclasses.replace(small_config.training, epochs=10)
    config = dataclasses.replace(small_config, data=data, features=features, training=training)
    result = train_run(config, tmp_path)
    assert result.metrics["valid/recall@10"] > 1.5 * popularity_recall


def test_refit_trains_again_on_train_and_validation_for_the_best_epochs(small_config, tmp_path):
    """``training.refit``: a second model from scratch on train + validation (features
    fitted on both), for the best epoch's number of epochs at the first run's learning
    rates and no validation; its test metrics are reported, the first run's validation
    ones kept."""
    import json

    from twotower.config import apply_overrides
    from twotower.sources import load_data
    from twotower.training.run import evaluate_run

    config = apply_overrides(
        small_config, ["training.refit=true", "training.lr_schedule=cosine", "training.epochs=3"]
    )
    result = train_run(config, tmp_path / "run")
    best = result.metrics["best_epoch"]
    assert result.metrics["refit_epochs"] == best >= 1
    first = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    again = [
        json.loads(line) for line in (tmp_path / "run/refit/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["lr"] for r in again] == [r["lr"] for r in first[:best]]
    assert not any(key.startswith("valid/") for r in again for key in r)
    # the first run's validation, the refit's test
    assert result.metrics["valid/recall@10"] == first[best - 1]["valid/recall@10"]
    refit_test = evaluate_run(tmp_path / "run/refit", ("test",), [10])
    assert result.metrics["test/recall@10"] == pytest.approx(refit_test["test/recall@10"])
    # one epoch's steps: every training and validation interaction, once
    dataset, split = load_data(config)
    rows = split.train.num_rows + split.valid.num_rows
    assert again[0]["step"] == -(-rows // config.training.batch_size)
    assert first[0]["step"] == -(-split.train.num_rows // config.training.batch_size)


def test_refit_is_refused_on_a_stream():
    from twotower.config import Config
    from twotower.data.config import DataConfig, StreamConfig
    from twotower.training.config import TrainingConfig

    stream = StreamConfig(train="t", valid="v", test="t", items="i")
    with pytest.raises(ValueError, match=r"training.refit gather each query's whole"):
        Config(data=DataConfig(source="stream", stream=stream), training=TrainingConfig(refit=True))


def test_a_run_with_item_biases_learns(small_config, popularity_recall, tmp_path):
    """``model.item_bias`` with the full softmax: the run learns, and its item biases
    move from 0 toward the items' popularity (the planted data's popular items)."""
    import numpy as np

    from twotower.config import apply_overrides
    from twotower.sources import load_data
    from twotower.towers.model import embed_rows
    from twotower.training.run import load_model

    config = apply_overrides(small_config, ["model.item_bias=true", "training.objective.kind=full"])
    result = train_run(config, tmp_path)
    assert result.metrics["valid/recall@10"] > 1.5 * popularity_recall
    _, pipeline, model = load_model(tmp_path)
    dataset, split = load_data(config)
    biases = embed_rows(model.item_tower, pipeline, "item", dataset.items)[:, -1].numpy()
    counts = np.bincount(split.train.column("item_idx").to_numpy(), minlength=len(biases))
    assert np.corrcoef(biases, counts)[0, 1] > 0.3
