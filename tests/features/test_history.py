"""History features: a user's most recent training items, in the item-id vocabulary."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from twotower.data.config import SplitConfig, SyntheticConfig
from twotower.data.dataset import ITEM_IDX, QUERY_IDX, TIMESTAMP, Dataset
from twotower.data.splits import split_interactions
from twotower.data.synthetic import generate
from twotower.errors import DataError
from twotower.features.history import HistoryTransform, Recent
from twotower.features.pipeline import FeaturePipeline
from twotower.features.specs import FeaturesConfig, HistoryFeature, IdFeature
from twotower.features.transform import FitContext

# Users 1-3, items 10-16 (17 has no interaction). leave_last_out per user, by
# (timestamp, row), a later row counting as more recent:
#   user 1: 10 (t1), 12 (t2), 11 (t3, row 1), 13 (t3, row 3) train; 14 (t8) valid; 15 (t9) test
#   user 2: 12 (t4, row 6), 10 (t4, row 7) train; 16 (t6) valid; 15 (t10) test
#   user 3: 11 (t5) train (a single interaction stays in train)
USERS = [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3]
ITEMS = [10, 11, 12, 13, 14, 15, 12, 10, 16, 15, 11]
TIMES = [1, 3, 2, 3, 8, 9, 4, 4, 6, 10, 5]
# Training counts: 10 twice, 11 twice, 12 twice, 13 once -> item-id indices 10 2, 11 3,
# 12 4, 13 5; 14, 15, 16 and 17 never trained: out of vocabulary (1).
INDEX = {10: 2, 11: 3, 12: 4, 13: 5}


def _dataset(timestamps: bool = True) -> Dataset:
    columns = {"query_id": USERS, "item_id": ITEMS}
    if timestamps:
        columns["timestamp"] = TIMES
    items = pa.table({"item_id": list(range(10, 18))})
    return Dataset.from_tables(pa.table(columns), None, items)


def _pipeline(dataset: Dataset, max_len: int = 6, min_count: int = 1) -> FeaturePipeline:
    config = FeaturesConfig(
        query=[HistoryFeature("history", "query_id", item_feature="item_id", max_len=max_len)],
        item=[IdFeature("item_id", "item_id", min_count=min_count)],
    )
    return FeaturePipeline.fit(config, dataset, split_interactions(dataset, SplitConfig()).train)


def _history(pipeline: FeaturePipeline, users: list) -> np.ndarray:
    keys = pa.table({"query_id": pa.array(users, pa.int64())})
    return pipeline.transform("query", keys)["history"].numpy()


def test_split_is_the_one_the_comment_describes() -> None:
    split = split_interactions(_dataset(), SplitConfig())
    assert split.train.column("item_id").to_pylist() == [10, 11, 12, 13, 12, 10, 11]
    assert split.valid.column("item_id").to_pylist() == [14, 16]
    assert split.test.column("item_id").to_pylist() == [15, 15]


def test_most_recent_training_items_first_padded_with_0() -> None:
    history = _history(_pipeline(_dataset()), [1, 2, 3])
    expected = [
        [13, 11, 12, 10],  # 13 and 11 tie at t3: row 3 is later
        [10, 12],  # tie at t4: row 7 is later
        [11],
    ]
    for row, items in zip(history, expected, strict=True):
        np.testing.assert_array_equal(row, [INDEX[i] for i in items] + [0] * (6 - len(items)))
    assert history.dtype == np.int64


def test_history_is_in_the_item_id_vocabulary() -> None:
    pipeline = _pipeline(_dataset())
    item_ids = pipeline.transform("item", pa.table({"item_id": list(INDEX)}))["item_id"]
    assert item_ids.tolist() == list(INDEX.values())


def test_without_timestamps_later_rows_are_more_recent() -> None:
    # By row alone, user 1's last two rows (14, 15) leave; 10 11 12 13 stay, newest last.
    history = _history(_pipeline(_dataset(timestamps=False)), [1])
    np.testing.assert_array_equal(history[0], [5, 4, 3, 2, 0, 0])


def test_truncated_to_the_max_len_most_recent() -> None:
    history = _history(_pipeline(_dataset(), max_len=2), [1, 2, 3])
    np.testing.assert_array_equal(history, [[5, 3], [2, 4], [3, 0]])


def test_an_item_out_of_the_item_vocabulary_is_oov_in_the_history() -> None:
    history = _history(_pipeline(_dataset(), min_count=2), [1])  # 13 trained once
    np.testing.assert_array_equal(history[0], [1, 3, 4, 2, 0, 0])


def test_no_validation_or_test_item_appears() -> None:
    pipeline = _pipeline(_dataset())
    history = _history(pipeline, [1, 2, 3])
    held_out = pipeline.transform("item", pa.table({"item_id": [14, 15, 16]}))["item_id"]
    assert held_out.tolist() == [1, 1, 1]  # never trained
    assert not np.isin(history, held_out.numpy()).any()


def test_unseen_and_missing_users_get_all_zeros() -> None:
    history = _history(_pipeline(_dataset()), [99, None, 1])
    assert not history[:2].any()
    assert history[2].any()


def test_history_needs_the_training_interactions() -> None:
    transform = HistoryTransform(HistoryFeature("h", "query_id", item_feature="item_id"))
    with pytest.raises(DataError, match="training interactions"):
        transform.fit(pa.array([1]), FitContext())


@pytest.mark.parametrize("method", ["leave_last_out", "random"])
def test_synthetic_history_matches_a_plain_loop_over_training_rows(method: str) -> None:
    dataset = generate(SyntheticConfig(num_queries=60, num_items=40, seed=3)).dataset
    config = FeaturesConfig(
        query=[HistoryFeature("history", "user_id", item_feature="item_id", max_len=8)],
        item=[IdFeature("item_id", "item_id")],
    )
    split = split_interactions(dataset, SplitConfig(method=method))
    train = split.train
    pipeline = FeaturePipeline.fit(config, dataset, train)
    history = pipeline.transform("query", dataset.queries)["history"].numpy()
    item_index = pipeline.transform("item", dataset.items)["item_id"].numpy()

    rows = zip(
        train.column(QUERY_IDX).to_pylist(),
        train.column(ITEM_IDX).to_pylist(),
        train.column(TIMESTAMP).to_pylist(),
        range(train.num_rows),
        strict=True,
    )
    expected = np.zeros_like(history)
    by_user: dict[int, list[tuple[int, int, int]]] = {}
    for user, item, time, position in rows:
        by_user.setdefault(user, []).append((time, position, item))
    for user, events in by_user.items():
        recent = [item_index[item] for _, _, item in sorted(events, reverse=True)][:8]
        expected[user, : len(recent)] = recent
    np.testing.assert_array_equal(history, expected)
    assert (history[history > 0] >= 2).all()  # every trained item is in the vocabulary
    # A user meets an item at most once here, so a held-out item is never in their history.
    for part in (split.valid, split.test):
        held_out = zip(
            part.column(QUERY_IDX).to_pylist(), part.column(ITEM_IDX).to_pylist(), strict=True
        )
        for user, item in held_out:
            assert item_index[item] not in history[user]


def _timed_pipeline(dataset: Dataset) -> FeaturePipeline:
    config = FeaturesConfig(
        query=[
            HistoryFeature(
                "history",
                "query_id",
                item_feature="item_id",
                max_len=6,
                encoder="attention",
                time_buckets=4,
            )
        ],
        item=[IdFeature("item_id", "item_id")],
    )
    return FeaturePipeline.fit(config, dataset, split_interactions(dataset, SplitConfig()).train)


def test_time_buckets_give_each_history_items_timestamp_beside_it() -> None:
    pipeline = _timed_pipeline(_dataset())
    inputs = pipeline.transform("query", pa.table({"query_id": pa.array([1, 2, 3, 9], pa.int64())}))
    times = inputs["history:times"].numpy()
    assert times.dtype == np.float64 and times.shape == inputs["history"].shape == (4, 6)
    # the items of test_most_recent_training_items_first_padded_with_0, their times
    expected = [[3, 3, 2, 1], [4, 4], [5], []]
    for row, stamps in zip(times, expected, strict=True):
        np.testing.assert_array_equal(row, stamps + [0] * (6 - len(stamps)))
    restored = FeaturePipeline.from_bytes(*pipeline.to_bytes(), "a test")
    keys = pa.table({"query_id": pa.array([1, 2], pa.int64())})
    np.testing.assert_array_equal(restored.transform("query", keys)["history:times"], times[:2])


def test_time_buckets_without_timestamps_are_refused_naming_the_feature() -> None:
    with pytest.raises(DataError, match="'history' has time_buckets, but the interactions"):
        _timed_pipeline(_dataset(timestamps=False))


def test_time_buckets_are_read_by_attention_only() -> None:
    with pytest.raises(ValueError, match="read by the 'attention' encoder only, not by 'mean'"):
        HistoryFeature("h", "u", "i", time_buckets=8)
    with pytest.raises(ValueError, match="time_buckets must be >= 0 and time_unit > 0"):
        HistoryFeature("h", "u", "i", encoder="attention", time_buckets=8, time_unit=0)


def test_recent_lists_without_an_item_are_padding_throughout() -> None:
    """Rows none of which has an item (a batch of cold rows) pad as rows with items do:
    item row -1 and no timestamp everywhere; a row with items beside them does not."""
    empty = Recent.ragged(np.array([0, 0]), np.array([], np.int64), np.array([]), 3)
    assert empty.rows.dtype == np.int64 and empty.times.dtype == np.float64
    np.testing.assert_array_equal(empty.rows, np.full((2, 3), -1))
    assert np.isnan(empty.times).all()
    mixed = Recent.ragged(np.array([0, 2]), np.array([5, 7]), np.array([1.0, 2.0]), 3)
    np.testing.assert_array_equal(mixed.rows, [[-1, -1, -1], [5, 7, -1]])
    np.testing.assert_array_equal(mixed.times, [[np.nan] * 3, [1.0, 2.0, np.nan]])
