"""Splits: hand-made cases for each method, leakage checks and a partition property."""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twotower.data.config import SplitConfig, SyntheticConfig
from twotower.data.dataset import Dataset
from twotower.data.splits import SPLIT_NAMES, Split, split_interactions
from twotower.data.synthetic import generate
from twotower.errors import DataError


def _dataset(queries: list, timestamps: list | None = None) -> Dataset:
    """Interactions numbered by ``row`` (their source position); items are the rows."""
    columns = {
        "query_id": queries,
        "item_id": list(range(len(queries))),
        "row": range(len(queries)),
    }
    if timestamps is not None:
        columns["timestamp"] = timestamps
    return Dataset.from_tables(pa.table(columns), name="toy")


def _rows(split: Split) -> dict[str, list[int]]:
    return {name: split.part(name).column("row").to_pylist() for name in SPLIT_NAMES}


def _assert_partition(split: Split, num_rows: int) -> None:
    """Every interaction is in exactly one part."""
    rows = [r for part in _rows(split).values() for r in part]
    assert sorted(rows) == list(range(num_rows))


def _assert_no_query_row_in_two_parts(split: Split) -> None:
    seen: dict[tuple, str] = {}
    for name in SPLIT_NAMES:
        part = split.part(name).to_pydict()
        for key in zip(part["query_id"], part["row"], strict=True):
            assert key not in seen, f"{key} is in {seen[key]} and {name}"
            seen[key] = name


def _times_by_query(part: pa.Table) -> dict[object, list[int]]:
    times: dict[object, list[int]] = defaultdict(list)
    columns = part.to_pydict()
    for q, t in zip(columns["query_id"], columns["timestamp"], strict=True):
        times[q].append(t)
    return dict(times)


def _assert_time_ordered_per_query(split: Split) -> None:
    """Within each query: train <= valid <= test in time (leave_last_out)."""
    train, valid, test = (_times_by_query(split.part(n)) for n in SPLIT_NAMES)
    for q, (t,) in test.items():
        assert all(t >= s for s in train.get(q, []) + valid.get(q, []))
    for q, (t,) in valid.items():
        assert all(t >= s for s in train.get(q, []))


# ---- leave_last_out --------------------------------------------------------------------


def test_leave_last_out_by_timestamp() -> None:
    #        row:   0    1    2    3    4    5    6    7    8    9
    queries = ["a", "b", "a", "c", "a", "d", "c", "a", "d", "d"]
    times = [5, 9, 1, 4, 3, 2, 3, 5, 1, 7]
    # a: rows 2 (t=1), 4 (t=3), 0 (t=5), 7 (t=5): the tie goes to the later row, 7.
    # b: one interaction, train only. c: two, train (row 6, t=3) + test (row 3, t=4).
    # d: rows 8 (t=1), 5 (t=2), 9 (t=7).
    split = split_interactions(_dataset(queries, times), SplitConfig(method="leave_last_out"))
    assert _rows(split) == {"train": [1, 2, 4, 6, 8], "valid": [0, 5], "test": [3, 7, 9]}


def test_leave_last_out_without_timestamps_uses_row_order() -> None:
    queries = ["a", "a", "b", "a", "b", "b"]
    split = split_interactions(_dataset(queries), SplitConfig(method="leave_last_out"))
    assert _rows(split) == {"train": [0, 2], "valid": [1, 4], "test": [3, 5]}


def test_leave_last_out_test_is_never_before_train() -> None:
    data = generate(SyntheticConfig(num_queries=200, num_items=100, interactions_per_query=8))
    split = split_interactions(data.dataset, SplitConfig(method="leave_last_out"))
    _assert_time_ordered_per_query(split)
    # Every synthetic user has at least 5 interactions: one valid and one test each.
    assert split.valid.num_rows == split.test.num_rows == data.dataset.num_queries


def test_leave_last_out_with_no_query_of_three_leaves_valid_empty() -> None:
    with pytest.raises(DataError, match="toy: the valid split has no interactions"):
        split_interactions(_dataset(["a", "a", "b"], [1, 2, 3]), SplitConfig())


# ---- random ----------------------------------------------------------------------------


def _many_queries(counts: dict[str, int]) -> Dataset:
    queries = [q for q, n in counts.items() for _ in range(n)]
    order = np.random.default_rng(0).permutation(len(queries))  # interleave the queries
    return _dataset([queries[i] for i in order])


def test_random_split_sizes_per_query() -> None:
    # n=10: 8/1/1. n=20: 16/2/2. n=3: round(2.4)=2, round(2.7)-2=1, so 2/1/0.
    dataset = _many_queries({"ten": 10, "twenty": 20, "three": 3})
    split = split_interactions(dataset, SplitConfig(method="random", seed=1))
    sizes = {name: Counter(split.part(name).column("query_id").to_pylist()) for name in SPLIT_NAMES}
    assert sizes["train"] == {"ten": 8, "twenty": 16, "three": 2}
    assert sizes["valid"] == {"ten": 1, "twenty": 2, "three": 1}
    assert sizes["test"] == {"ten": 1, "twenty": 2}
    _assert_partition(split, dataset.interactions.num_rows)


def test_random_split_other_ratios() -> None:
    dataset = _many_queries({"a": 10, "b": 10})
    split = split_interactions(dataset, SplitConfig(method="random", ratios=[0.5, 0.2, 0.3]))
    assert [split.part(name).num_rows for name in SPLIT_NAMES] == [10, 4, 6]


def test_random_split_is_deterministic_by_seed() -> None:
    dataset = _many_queries({f"q{i}": 10 for i in range(50)})
    first = _rows(split_interactions(dataset, SplitConfig(method="random", seed=7)))
    again = _rows(split_interactions(dataset, SplitConfig(method="random", seed=7)))
    other = _rows(split_interactions(dataset, SplitConfig(method="random", seed=8)))
    assert first == again
    assert first["test"] != other["test"]


def test_random_split_is_a_partition_without_leakage() -> None:
    dataset = _many_queries({f"q{i}": 3 + i % 9 for i in range(40)})
    split = split_interactions(dataset, SplitConfig(method="random", seed=3))
    _assert_partition(split, dataset.interactions.num_rows)
    _assert_no_query_row_in_two_parts(split)


# ---- time ------------------------------------------------------------------------------


def test_time_split_with_explicit_cutoffs() -> None:
    times = [7, 1, 5, 9, 3, 8, 5, 2]
    dataset = _dataset(["a", "b", "a", "b", "a", "b", "c", "c"], times)
    split = split_interactions(dataset, SplitConfig(method="time", valid_from=5, test_from=8))
    # train: t < 5; valid: 5 <= t < 8; test: t >= 8.
    assert _rows(split) == {"train": [1, 4, 7], "valid": [0, 2, 6], "test": [3, 5]}


def test_time_split_by_quantiles() -> None:
    # t = 1..10: test_from = quantile(0.9) = 9.1, valid_from = quantile(0.8) = 8.2.
    times = list(range(1, 11))
    split = split_interactions(_dataset(["a", "b"] * 5, times), SplitConfig(method="time"))
    assert [split.part(n)["timestamp"].to_pylist() for n in SPLIT_NAMES] == [
        list(range(1, 9)),
        [9],
        [10],
    ]


def test_time_split_no_train_interaction_after_a_test_one() -> None:
    data = generate(SyntheticConfig(num_queries=100, num_items=80, interactions_per_query=6))
    split = split_interactions(data.dataset, SplitConfig(method="time", ratios=[0.7, 0.15, 0.15]))
    train, valid, test = (split.part(n)["timestamp"].to_numpy() for n in SPLIT_NAMES)
    assert train.max() < valid.min()
    assert valid.max() < test.min()


def test_time_split_cutoffs_in_the_wrong_order() -> None:
    dataset = _dataset(["a", "b", "c"], [1, 2, 3])
    with pytest.raises(DataError, match="valid_from \\(3.0\\) is after test_from \\(2.0\\)"):
        split_interactions(dataset, SplitConfig(method="time", valid_from=3.0, test_from=2.0))


def test_time_split_without_timestamps() -> None:
    with pytest.raises(DataError, match="toy: split method 'time' needs a timestamp column"):
        split_interactions(_dataset(["a", "b", "c"]), SplitConfig(method="time"))


def test_time_split_leaving_a_part_empty() -> None:
    dataset = _dataset(["a", "b", "c"], [1, 2, 3])
    with pytest.raises(DataError, match="the test split has no interactions"):
        split_interactions(dataset, SplitConfig(method="time", valid_from=2, test_from=10))


# ---- train_from: a new period's examples ------------------------------------------------


def test_train_from_makes_only_the_new_period_training_examples() -> None:
    times = [7, 1, 5, 9, 3, 8, 5, 2, 4]
    dataset = _dataset(["a", "b", "a", "b", "a", "b", "c", "c", "a"], times)
    cuts = {"method": "time", "valid_from": 5, "test_from": 8}
    whole = split_interactions(dataset, SplitConfig(**cuts))
    split = split_interactions(dataset, SplitConfig(**cuts, train_from=3))
    # train (t < 5) still holds every earlier interaction: rows 1 (t=1), 4 (t=3),
    # 7 (t=2), 8 (t=4); the examples are those at or after t=3: rows 4 and 8
    assert (
        _rows(split)
        == _rows(whole)
        == {
            "train": [1, 4, 7, 8],
            "valid": [0, 2, 6],
            "test": [3, 5],
        }
    )
    assert whole.examples is None and whole.training_examples is whole.train
    assert split.examples.tolist() == [1, 3]  # rows of train
    assert split.training_examples.column("row").to_pylist() == [4, 8]


def test_train_from_works_with_any_method() -> None:
    #        row:   0    1    2    3    4    5    6    7
    queries = ["a", "a", "a", "a", "b", "b", "b", "b"]
    times = [1, 2, 3, 4, 1, 5, 6, 7]
    split = split_interactions(
        _dataset(queries, times), SplitConfig(method="leave_last_out", train_from=2)
    )
    assert _rows(split)["train"] == [0, 1, 4, 5]
    assert split.training_examples.column("row").to_pylist() == [1, 5]


def test_refit_split_moves_validation_into_the_examples() -> None:
    dataset = _dataset(["a", "b", "a", "b", "a", "b"], [1, 2, 3, 4, 5, 6])
    config = SplitConfig(method="time", valid_from=4, test_from=6, train_from=2)
    refit = split_interactions(dataset, config).with_valid_in_train()
    assert refit.valid.num_rows == 0
    assert refit.train.column("row").to_pylist() == [0, 1, 2, 3, 4]
    assert refit.training_examples.column("row").to_pylist() == [1, 2, 3, 4]


def test_train_from_needs_timestamps() -> None:
    with pytest.raises(DataError, match="toy: split.train_from .* no timestamp column"):
        split_interactions(_dataset(["a", "a", "a"]), SplitConfig(train_from=1))


def test_train_from_after_every_training_interaction() -> None:
    dataset = _dataset(["a", "a", "a", "b", "b", "b"], [1, 2, 3, 4, 5, 6])
    with pytest.raises(DataError, match=r"no training interaction at or after .*\(50\); .* from 1"):
        split_interactions(dataset, SplitConfig(train_from=50))


def test_train_from_after_valid_from_is_refused() -> None:
    with pytest.raises(ValueError, match="train_from \\(5\\) must come before valid_from"):
        SplitConfig(method="time", valid_from=5, test_from=8, train_from=5)


# ---- given -----------------------------------------------------------------------------


def test_given_without_files() -> None:
    with pytest.raises(DataError, match="set data.valid and data.test"):
        split_interactions(_dataset(["a", "b", "c"]), SplitConfig(method="given"))


def test_given_uses_the_split_column() -> None:
    table = pa.table(
        {"query_id": [1, 1, 2, 2], "item_id": [1, 2, 3, 4], "row": range(4), "split": [0, 2, 1, 0]}
    )
    split = split_interactions(Dataset.from_tables(table), SplitConfig(method="given"))
    assert _rows(split) == {"train": [0, 3], "valid": [2], "test": [1]}


def test_bad_ratios() -> None:
    with pytest.raises(ValueError, match="summing to 1"):
        SplitConfig(ratios=[0.5, 0.2, 0.2])


# ---- new_items: items held out of training entirely ------------------------------------


def _synthetic() -> Dataset:
    return generate(
        SyntheticConfig(num_queries=120, num_items=60, interactions_per_query=8)
    ).dataset


def _items_of(part: pa.Table) -> np.ndarray:
    return part.column("item_idx").to_numpy()


@pytest.mark.parametrize("method", ["leave_last_out", "random", "time"])
def test_new_items_interactions_are_all_in_test(method: str) -> None:
    dataset = _synthetic()
    split = split_interactions(dataset, SplitConfig(method=method, new_items=0.2))
    new = split.new_items
    counts = np.bincount(dataset.column("item_idx"), minlength=dataset.num_items)
    assert len(new) == round(0.2 * np.count_nonzero(counts)) > 0
    assert np.all(np.diff(new) > 0)  # sorted, distinct
    assert not np.isin(_items_of(split.train), new).any()
    assert not np.isin(_items_of(split.valid), new).any()
    in_test = np.isin(_items_of(split.test), new)
    assert in_test.sum() == counts[new].sum()  # every one of their interactions
    assert sum(split.part(name).num_rows for name in SPLIT_NAMES) == dataset.interactions.num_rows
    assert split.new_items_in("test") is new and split.new_items_in("valid") is None


@pytest.mark.parametrize("method", ["leave_last_out", "random", "time"])
def test_new_items_leave_the_method_to_split_the_others(method: str) -> None:
    """The other items' interactions are split as the method splits them alone."""
    dataset = _synthetic()
    split = split_interactions(dataset, SplitConfig(method=method, new_items=0.2, seed=4))
    held = np.isin(dataset.column("item_idx"), split.new_items)
    others = dataclasses.replace(dataset, interactions=dataset.interactions.filter(~held))
    alone = split_interactions(others, SplitConfig(method=method, seed=4))
    assert split.train.equals(alone.train) and split.valid.equals(alone.valid)
    old_test = split.test.filter(~np.isin(_items_of(split.test), split.new_items))
    assert old_test.equals(alone.test)


def test_new_items_are_drawn_by_the_seed() -> None:
    dataset = _synthetic()
    draw = {
        seed: split_interactions(dataset, SplitConfig(new_items=0.2, seed=seed)).new_items
        for seed in (0, 0, 1)
    }
    again = split_interactions(dataset, SplitConfig(method="random", new_items=0.2)).new_items
    assert np.array_equal(draw[0], again)  # the same items whatever the method
    assert not np.array_equal(draw[0], draw[1])
    config = SplitConfig(method="random", new_items=0.2, seed=3)
    first, second = (split_interactions(dataset, config) for _ in range(2))
    assert all(first.part(name).equals(second.part(name)) for name in SPLIT_NAMES)


def test_new_items_only_among_items_with_enough_interactions() -> None:
    dataset = _synthetic()
    counts = np.bincount(dataset.column("item_idx"), minlength=dataset.num_items)
    config = SplitConfig(new_items=0.3, new_items_min_count=10)
    new = split_interactions(dataset, config).new_items
    assert counts[new].min() >= 10
    assert len(new) == round(0.3 * np.count_nonzero(counts >= 10))


def test_new_items_with_given_parts() -> None:
    # item 3 (rows 1 and 4) is the only item with two interactions: the one drawn
    table = pa.table(
        {
            "query_id": [1, 1, 2, 2, 3, 3],
            "item_id": [1, 3, 4, 5, 3, 6],
            "row": range(6),
            "split": [0, 0, 1, 0, 0, 2],
        }
    )
    config = SplitConfig(method="given", new_items=0.5, new_items_min_count=2)
    split = split_interactions(Dataset.from_tables(table), config)
    assert _rows(split) == {"train": [0, 3], "valid": [2], "test": [1, 4, 5]}


def test_refit_split_keeps_the_new_items() -> None:
    split = split_interactions(_synthetic(), SplitConfig(new_items=0.1))
    assert split.with_valid_in_train().new_items is split.new_items


@pytest.mark.parametrize("method", ["leave_last_out", "random", "time"])
def test_new_items_valid_interactions_are_all_in_validation(method: str) -> None:
    dataset = _synthetic()
    config = SplitConfig(method=method, new_items=0.2, new_items_valid=0.1, seed=2)
    split = split_interactions(dataset, config)
    new, valid_new = split.new_items, split.new_items_valid
    counts = np.bincount(dataset.column("item_idx"), minlength=dataset.num_items)
    assert len(valid_new) == round(0.1 * np.count_nonzero(counts)) > 0
    assert np.all(np.diff(valid_new) > 0) and not np.isin(valid_new, new).any()
    assert not np.isin(_items_of(split.train), valid_new).any()
    assert not np.isin(_items_of(split.test), valid_new).any()
    assert np.isin(_items_of(split.valid), valid_new).sum() == counts[valid_new].sum()
    assert split.new_items_in("valid") is valid_new and split.new_items_in("test") is new
    # test's new items are those drawn without validation's
    plain = split_interactions(dataset, dataclasses.replace(config, new_items_valid=0.0))
    assert np.array_equal(plain.new_items, new)
    # the method splits the other items' interactions as it splits them alone
    held = np.isin(dataset.column("item_idx"), np.concatenate([new, valid_new]))
    others = dataclasses.replace(dataset, interactions=dataset.interactions.filter(~held))
    alone = split_interactions(others, SplitConfig(method=method, seed=2))
    assert split.train.equals(alone.train)
    for name, items in (("valid", valid_new), ("test", new)):
        kept = split.part(name).filter(~np.isin(_items_of(split.part(name)), items))
        assert kept.equals(alone.part(name))


def test_new_items_valid_alone_and_refit() -> None:
    split = split_interactions(_synthetic(), SplitConfig(new_items_valid=0.2))
    assert split.new_items is None and split.new_items_in("test") is None
    assert len(split.new_items_in("valid")) > 0
    assert split.with_valid_in_train().new_items_valid is None  # trained on in a refit


def test_new_item_shares_need_enough_items() -> None:
    # one item (3) has two interactions: each share draws at least one
    table = pa.table({"query_id": [1, 1, 2, 2, 3], "item_id": [1, 3, 4, 3, 6]})
    config = SplitConfig(new_items=0.5, new_items_valid=0.4, new_items_min_count=2)
    with pytest.raises(DataError, match="toy: .* draw 1 and 1 items, more than the 1 with"):
        split_interactions(Dataset.from_tables(table, name="toy"), config)


def test_no_item_with_enough_interactions_to_draw() -> None:
    with pytest.raises(DataError, match="toy: split.new_items .* at least 5 interactions"):
        split_interactions(
            _dataset(["a", "a", "b"]), SplitConfig(new_items=0.5, new_items_min_count=5)
        )


@pytest.mark.parametrize(
    "bad",
    [
        {"new_items": 1.0},
        {"new_items": -0.1},
        {"new_items_min_count": 0},
        {"new_items_valid": 1.0},
        {"new_items_valid": -0.1},
        {"new_items": 0.6, "new_items_valid": 0.4},
    ],
)
def test_bad_new_items(bad: dict) -> None:
    with pytest.raises(ValueError, match="new_items"):
        SplitConfig(**bad)


# ---- property: a split is a deterministic partition ------------------------------------

_interactions = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 10)),  # (query, timestamp)
    min_size=1,
    max_size=60,
)


@settings(max_examples=75, deadline=None)
@given(
    rows=_interactions,
    method=st.sampled_from(["leave_last_out", "random", "time"]),
    seed=st.integers(0, 2**16),
)
def test_split_is_a_deterministic_partition(rows: list, method: str, seed: int) -> None:
    queries = [q for q, _ in rows]
    dataset = _dataset(queries, [t for _, t in rows])
    config = SplitConfig(method=method, seed=seed, ratios=[0.6, 0.2, 0.2])
    try:
        split = split_interactions(dataset, config)
    except DataError as err:  # a part can be empty on tiny tables: then it must say so
        assert "has no interactions" in str(err)
        with pytest.raises(DataError):
            split_interactions(dataset, config)
        return
    _assert_partition(split, len(rows))
    _assert_no_query_row_in_two_parts(split)
    assert _rows(split_interactions(dataset, config)) == _rows(split)
    if method == "leave_last_out":
        _assert_time_ordered_per_query(split)
