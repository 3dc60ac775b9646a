"""Generated interactions for the data build tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twotower.data.config import DataConfig, InteractionsConfig, SplitConfig, SyntheticConfig
from twotower.data.dataset import ITEM_ID, QUERY_ID, TIMESTAMP
from twotower.data.synthetic import generate


@pytest.fixture(scope="session")
def splits() -> dict[str, SplitConfig]:
    """A split config of each method the build computes."""
    return {
        "leave_last_out": SplitConfig(method="leave_last_out"),
        "random": SplitConfig(method="random", ratios=[0.7, 0.15, 0.15], seed=3),
        "time": SplitConfig(method="time", ratios=[0.8, 0.1, 0.1]),
    }


@pytest.fixture(scope="session")
def generated(tmp_path_factory) -> DataConfig:
    """Generated interactions as Parquet, with ties in time so order by source matters."""
    folder = tmp_path_factory.mktemp("generated")
    dataset = generate(
        SyntheticConfig(num_queries=300, num_items=200, interactions_per_query=12)
    ).dataset
    interactions = dataset.interactions
    coarse = pa.array(np.asarray(interactions[TIMESTAMP].to_numpy()) // 5)  # many ties
    interactions = interactions.set_column(
        interactions.schema.get_field_index(TIMESTAMP), TIMESTAMP, coarse
    )
    path = folder / "interactions.parquet"
    pq.write_table(interactions.select([QUERY_ID, ITEM_ID, TIMESTAMP]), path, row_group_size=700)
    roles = InteractionsConfig(path, query_id=QUERY_ID, item_id=ITEM_ID, timestamp=TIMESTAMP)
    return DataConfig(source="files", interactions=roles)


@pytest.fixture(scope="session")
def with_tables(tmp_path_factory) -> DataConfig:
    """The synthetic demo tables: interactions, a user table and an item table."""
    from twotower.data.config import FeatureTableConfig, SyntheticConfig
    from twotower.data.synthetic import generate, write_parquet

    folder = tmp_path_factory.mktemp("tables")
    dataset = generate(SyntheticConfig(num_queries=200, num_items=150)).dataset
    paths = write_parquet(dataset, folder)
    return DataConfig(
        source="files",
        interactions=InteractionsConfig(
            paths["interactions"], query_id="user_id", item_id="item_id", timestamp="timestamp"
        ),
        queries=FeatureTableConfig(paths["queries"], key="user_id"),
        items=FeatureTableConfig(paths["items"], key="item_id"),
    )


ML100K = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "ml-100k"


@pytest.fixture
def ml100k_files() -> DataConfig:
    """MovieLens-100K's ratings as a ``files`` source (user, item, rating, ts columns)."""
    if not ML100K.is_dir():
        pytest.skip(f"MovieLens-100K not found at {ML100K}")
    roles = InteractionsConfig(
        ML100K / "u.data",
        delimiter="\t",
        header=False,
        columns=["user", "item", "rating", "ts"],
        query_id="user",
        item_id="item",
        timestamp="ts",
        weight="rating",
    )
    return DataConfig(source="files", interactions=roles)
