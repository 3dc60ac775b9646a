"""Loading options applied after reading: sampling queries for quick experiments."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from twotower.data.config import DataConfig, FeatureTableConfig, InteractionsConfig, SyntheticConfig
from twotower.data.load import load_dataset
from twotower.data.synthetic import generate, write_parquet

SMALL = SyntheticConfig(num_queries=300, num_items=200, num_clusters=8, interactions_per_query=10)


def test_sample_queries_keeps_the_interactions_of_that_many_users(tmp_path: Path) -> None:
    paths = write_parquet(generate(SMALL).dataset, tmp_path)
    config = DataConfig(
        source="files",
        interactions=InteractionsConfig(
            paths["interactions"], query_id="user_id", item_id="item_id"
        ),
        queries=FeatureTableConfig(paths["queries"], key="user_id"),
        items=FeatureTableConfig(paths["items"], key="item_id"),
        sample_queries=40,
        sample_seed=3,
    )
    full = load_dataset(dataclasses.replace(config, sample_queries=None))
    sampled = load_dataset(config)
    users = pc.unique(sampled.interactions.column("query_id")).to_pylist()
    assert len(users) == 40
    assert sampled.num_items == full.num_items and sampled.num_queries == full.num_queries
    kept = pc.is_in(full.interactions.column("query_id"), value_set=pa.array(users))
    assert sampled.interactions.num_rows == pc.sum(kept).as_py()
    assert load_dataset(config).interactions.equals(sampled.interactions)  # seeded
    assert load_dataset(dataclasses.replace(config, sample_queries=10**6)).interactions.equals(
        full.interactions
    )
    with pytest.raises(ValueError, match="sample_queries must be >= 1"):
        dataclasses.replace(config, sample_queries=0)
