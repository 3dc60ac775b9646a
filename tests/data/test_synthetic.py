"""The synthetic generator: deterministic, and its planted structure is really there."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from twotower.data.config import DataConfig, FeatureTableConfig, InteractionsConfig, SyntheticConfig
from twotower.data.load import load_dataset
from twotower.data.synthetic import SyntheticData, generate, write_parquet

SMALL = SyntheticConfig(num_queries=300, num_items=200, num_clusters=8, interactions_per_query=10)


@pytest.fixture(scope="module")
def data() -> SyntheticData:
    return generate(SMALL)


def _indices(data: SyntheticData) -> tuple[np.ndarray, np.ndarray]:
    return data.dataset.column("query_idx"), data.dataset.column("item_idx")


def test_same_seed_same_data(data: SyntheticData) -> None:
    again = generate(SMALL)
    for name in ("interactions", "queries", "items"):
        assert getattr(again.dataset, name).equals(getattr(data.dataset, name))
    np.testing.assert_array_equal(again.query_cluster, data.query_cluster)
    np.testing.assert_array_equal(again.item_cluster, data.item_cluster)


def test_other_seed_other_data(data: SyntheticData) -> None:
    other = generate(dataclasses.replace(SMALL, seed=1))
    assert not other.dataset.interactions.equals(data.dataset.interactions)
    assert not np.array_equal(other.item_cluster, data.item_cluster)


def test_shapes_and_keys(data: SyntheticData) -> None:
    dataset = data.dataset
    assert dataset.num_queries == SMALL.num_queries
    assert dataset.num_items == SMALL.num_items
    assert data.query_cluster.shape == (SMALL.num_queries,)
    assert data.item_cluster.shape == (SMALL.num_items,)
    assert data.affinity().shape == (SMALL.num_queries, SMALL.num_items)
    assert dataset.queries.column("user_id").to_pylist() == list(range(1, SMALL.num_queries + 1))
    assert dataset.items.column("item_id").to_pylist() == list(range(1, SMALL.num_items + 1))
    assert set(dataset.items.column_names) >= {"category", "price", "views", "genres", "title"}
    assert set(dataset.queries.column_names) >= {"segment", "age", "sessions"}


def test_every_query_has_at_least_five_distinct_items(data: SyntheticData) -> None:
    query_idx, item_idx = _indices(data)
    counts = np.bincount(query_idx, minlength=SMALL.num_queries)
    assert counts.min() >= 5
    assert abs(counts.mean() - SMALL.interactions_per_query) < 0.2 * SMALL.interactions_per_query
    pairs = query_idx * SMALL.num_items + item_idx
    assert len(np.unique(pairs)) == len(pairs)  # sampled without replacement


def test_timestamps_span_the_documented_range(data: SyntheticData) -> None:
    t = data.dataset.column("timestamp")
    assert t.min() >= 1_600_000_000
    assert t.max() < 1_600_000_000 + 180 * 24 * 3600


def test_queries_mostly_pick_items_of_their_own_cluster(data: SyntheticData) -> None:
    query_idx, item_idx = _indices(data)
    own = data.query_cluster[query_idx] == data.item_cluster[item_idx]
    # By chance it would be about 1 / num_clusters = 0.125.
    assert own.mean() > 3 / SMALL.num_clusters
    per_query = np.bincount(query_idx, weights=own) / np.bincount(query_idx)
    assert np.median(per_query) > 2 / SMALL.num_clusters


def test_item_category_follows_the_cluster(data: SyntheticData) -> None:
    category = pc.utf8_slice_codeunits(data.dataset.items.column("category"), 1)
    category = pc.cast(category, "int64").to_numpy()
    agree = category == data.item_cluster % 5
    assert 0.7 < agree.mean() < 1.0  # 80% by construction, plus chance agreement


def test_item_popularity_is_long_tailed(data: SyntheticData) -> None:
    _, item_idx = _indices(data)
    counts = np.sort(np.bincount(item_idx, minlength=SMALL.num_items))[::-1]
    top_tenth = counts[: SMALL.num_items // 10].sum() / counts.sum()
    assert top_tenth > 0.2  # twice a uniform share


def test_features_have_the_documented_missing_values(data: SyntheticData) -> None:
    assert data.dataset.items.column("price").null_count > 0
    assert data.dataset.queries.column("age").null_count > 0
    assert data.dataset.items.column("title").null_count == 0


def test_written_parquet_loads_back_as_the_same_dataset(
    data: SyntheticData, tmp_path: Path
) -> None:
    paths = write_parquet(data.dataset, tmp_path / "synthetic")
    config = DataConfig(
        source="files",
        interactions=InteractionsConfig(
            path=paths["interactions"], query_id="user_id", timestamp="timestamp"
        ),
        queries=FeatureTableConfig(path=paths["queries"], key="user_id"),
        items=FeatureTableConfig(path=paths["items"], key="item_id"),
    )
    loaded = load_dataset(config)
    assert loaded.queries.equals(data.dataset.queries)
    assert loaded.items.equals(data.dataset.items)
    for column in ("query_idx", "item_idx", "timestamp"):
        np.testing.assert_array_equal(loaded.column(column), data.dataset.column(column))


@pytest.mark.parametrize(
    "bad",
    [
        {"num_queries": 0},
        {"interactions_per_query": 4},
        {"num_items": 5, "interactions_per_query": 6},
    ],
)
def test_bad_settings(bad: dict) -> None:
    with pytest.raises(ValueError):
        SyntheticConfig(**bad)


def test_the_sample_does_not_depend_on_the_block_size() -> None:
    from twotower.data.synthetic import _sample_interactions

    data = generate(SMALL)
    counts = np.full(SMALL.num_queries, 6)
    drawn = [
        _sample_interactions(np.random.default_rng(3), data.affinity, counts, SMALL.num_items, m)
        for m in (SMALL.num_items, 7 * SMALL.num_items, 2**25)
    ]
    for query_idx, item_idx in drawn[1:]:
        np.testing.assert_array_equal(query_idx, drawn[0][0])
        np.testing.assert_array_equal(item_idx, drawn[0][1])


def test_a_million_item_corpus_is_generated_in_bounded_memory() -> None:
    data = generate(SyntheticConfig(num_queries=6, num_items=1_000_000, interactions_per_query=5))
    items = data.dataset.items
    assert items.num_rows == 1_000_000
    assert items.column("title").null_count == 0 and len(items.column("title")[-1].as_py()) > 0
    assert data.dataset.interactions.num_rows >= 6 * 5
