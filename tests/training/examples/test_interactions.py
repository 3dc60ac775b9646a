"""Training examples: every row once per epoch; histories never contain their target."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from twotower.data.config import SplitConfig
from twotower.data.dataset import Dataset
from twotower.data.splits import split_interactions
from twotower.errors import DataError
from twotower.features.pipeline import FeaturePipeline
from twotower.features.specs import FeaturesConfig, HistoryFeature, IdFeature
from twotower.training.examples import TrainingData

FEATURES = FeaturesConfig(
    query=[
        IdFeature("user_id", "user"),
        HistoryFeature("history", "user", item_feature="item_id", max_len=3),
    ],
    item=[IdFeature("item_id", "item")],
)


def make(
    timestamps: bool, history: str, features: FeaturesConfig = FEATURES
) -> tuple[TrainingData, FeaturePipeline]:
    # u1 saw a, b, c, d, e and u2 a, b, c, e, in that order by timestamp; the file
    # order differs, so without timestamps "earlier" means earlier in the file.
    columns = {
        "query_id": ["u1", "u1", "u2", "u1", "u1", "u1", "u2", "u2", "u2"],
        "item_id": ["c", "a", "b", "b", "e", "d", "a", "c", "e"],
    }
    if timestamps:
        columns["timestamp"] = [3, 1, 2, 2, 5, 4, 1, 3, 4]
    interactions = pa.table(columns)
    users = pa.table({"user": ["u1", "u2"]})
    items = pa.table({"item": ["a", "b", "c", "d", "e"]})
    dataset = Dataset.from_tables(interactions, users, items, query_key="user", item_key="item")
    split = split_interactions(dataset, SplitConfig(method="leave_last_out"))
    pipeline = FeaturePipeline.fit(features, dataset, split.train)
    return TrainingData(dataset, split, pipeline, history=history), pipeline


def names(pipeline: FeaturePipeline, codes: torch.Tensor) -> list[str]:
    vocabulary = pipeline.transforms["item"]["item_id"].vocabulary.values.to_pylist()
    return [vocabulary[c - 2] if c > 1 else "<oov>" for c in codes.tolist() if c != 0]


def test_before_event_history_holds_only_earlier_items_most_recent_first():
    data, pipeline = make(timestamps=True, history="auto")
    assert data.history_rule == "before_event"
    # training (leave-last-out keeps e for test, the one before for valid):
    # u1: a(1) b(2) c(3) -> valid d(4), test e(5); u2: a(1) b(2) -> valid c(3), test e(4)
    rows = torch.arange(len(data))
    batch = data.batch(rows)
    seen = {}
    for row, positive, history in zip(rows, batch.positives, batch.query["history"], strict=True):
        user = int(data.query_idx[row])
        item = names(pipeline, data.items["item_id"][positive : positive + 1])[0]
        seen[(user, item)] = names(pipeline, history)
    assert seen == {
        (0, "a"): [],
        (0, "b"): ["a"],
        (0, "c"): ["b", "a"],
        (1, "a"): [],
        (1, "b"): ["a"],
    }


def test_before_event_timestamps_are_those_of_the_earlier_items():
    timed = HistoryFeature(
        "history", "user", item_feature="item_id", max_len=3, encoder="attention", time_buckets=4
    )
    data, pipeline = make(True, "auto", FeaturesConfig(query=[timed], item=FEATURES.item))
    stamps = {"a": 1, "b": 2, "c": 3}  # both users' training items, at these times
    batch = data.batch(torch.arange(len(data)))
    for history, times in zip(batch.query["history"], batch.query["history:times"], strict=True):
        items = names(pipeline, history)
        assert times.dtype == torch.float64
        assert times.tolist() == [stamps[i] for i in items] + [0.0] * (3 - len(items))


def test_mask_target_removes_only_the_target():
    data, pipeline = make(timestamps=False, history="auto")
    assert data.history_rule == "mask_target"
    batch = data.batch(torch.arange(len(data)))
    full = data.query_inputs(data.query_idx)["history"]
    for positive, history, whole in zip(batch.positives, batch.query["history"], full, strict=True):
        target = data.items["item_id"][positive]
        assert target not in history.tolist()
        assert sorted(h for h in history.tolist() if h) == sorted(
            h for h in whole.tolist() if h and h != target
        )


@pytest.mark.parametrize("batch_size", [1, 2, 4, 100])
def test_an_epoch_yields_every_row_once(batch_size):
    data, _ = make(timestamps=True, history="before_event")
    generator = torch.Generator().manual_seed(3)
    positives = torch.cat([b.positives for b in data.batches(batch_size, generator)])
    assert len(positives) == len(data)
    assert sorted(positives.tolist()) == sorted(data.item_idx.tolist())


def test_item_counts_are_training_counts():
    data, _ = make(timestamps=True, history="auto")
    # training items: u1 a b c, u2 a b
    assert data.item_counts().tolist() == [2, 2, 1, 0, 0]


def test_test_step_histories_also_hold_the_validation_interaction():
    data, pipeline = make(timestamps=True, history="auto")
    everyone = torch.arange(2)
    # valid items: u1 d, u2 c; they join the front of the history at the test step
    # (d has no training interaction, so it is out of the training vocabulary)
    train_history = [names(pipeline, h) for h in data.query_inputs(everyone)["history"]]
    test_history = [names(pipeline, h) for h in data.query_inputs(everyone, "test")["history"]]
    assert train_history == [["c", "b", "a"], ["b", "a"]]
    assert test_history == [["<oov>", "c", "b"], ["c", "b", "a"]]
    assert data.query_inputs(everyone, "valid")["history"].tolist() == (
        data.query_inputs(everyone)["history"].tolist()
    )


def test_in_memory_data_offers_the_training_examples_interface(training_examples_members):
    data, _ = make(timestamps=True, history="auto")
    missing = [name for name in training_examples_members if not hasattr(data, name)]
    assert missing == []
    assert data.num_queries == len(next(iter(data.queries.values())))
    assert data.popularity == "known" and len(data.split.valid) > 0


def weighted(weights: str, column: list | None) -> TrainingData:
    """u1 rated a..e, u2 a..d (leave-last-out keeps five training rows)."""
    columns = {
        "query_id": ["u1"] * 5 + ["u2"] * 4,
        "item_id": ["a", "b", "c", "d", "e", "a", "b", "c", "d"],
        "timestamp": [1, 2, 3, 4, 5, 1, 2, 3, 4],
    }
    if column is not None:
        columns["weight"] = column
    dataset = Dataset.from_tables(
        pa.table(columns),
        pa.table({"user": ["u1", "u2"]}),
        pa.table({"item": ["a", "b", "c", "d", "e"]}),
        query_key="user",
        item_key="item",
    )
    split = split_interactions(dataset, SplitConfig(method="leave_last_out"))
    pipeline = FeaturePipeline.fit(FEATURES, dataset, split.train)
    return TrainingData(dataset, split, pipeline, weights=weights, weight_cap=3.0)


RATINGS = [1.0, 4.0, 0.0, 7.0, 7.0, 2.5, 10.0, 7.0, 7.0]  # the training rows: the first 3, 2
RULES = {"raw": lambda w: w, "log1p": math.log1p, "capped": lambda w: min(w, 3.0)}


@pytest.mark.parametrize("rule", RULES)
def test_each_example_carries_its_interactions_weight(rule):
    data = weighted(rule, RATINGS)
    assert sorted(data.split.train.column("weight").to_pylist()) == [0.0, 1.0, 2.5, 4.0, 10.0]
    rows = torch.tensor([4, 0, 3, 1, 2])
    batch = data.batch(rows)
    raw = data.split.train.column("weight").to_pylist()
    assert batch.weights.tolist() == pytest.approx([RULES[rule](raw[r]) for r in rows.tolist()])
    assert weighted("none", RATINGS).batch(rows).weights is None


def test_weights_without_a_weight_column_or_with_bad_ones_are_refused():
    with pytest.raises(DataError, match="the interactions have no weight column"):
        weighted("raw", None)
    with pytest.raises(DataError, match="1 training interaction weight.* negative or not a number"):
        weighted("log1p", [1.0, -2.0, *RATINGS[2:]])
