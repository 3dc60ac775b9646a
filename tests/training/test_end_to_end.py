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
