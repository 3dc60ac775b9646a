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
    from twotower.demo import _write_synthetic, demo_config

    config = demo_config(["data.synthetic.num_queries=200", "data.synthetic.num_items=150"])
    return _write_synthetic(config, tmp_path_factory.mktemp("tables"))


@pytest.fixture
def items_missing_rows(tmp_path) -> DataConfig:
    """A log whose items 7 and 8 have no row in the item table (items 0-6)."""
    from twotower.data.config import FeatureTableConfig

    rows = "".join(f"{q},{(q * 3 + k) % 9}\n" for q in range(30) for k in range(4 + q % 6))
    (tmp_path / "log.csv").write_text("u,i\n" + rows)
    (tmp_path / "items.csv").write_text("i,kind\n" + "".join(f"{i},k{i % 2}\n" for i in range(7)))
    return DataConfig(
        source="files",
        interactions=InteractionsConfig(tmp_path / "log.csv", query_id="u", item_id="i"),
        items=FeatureTableConfig(tmp_path / "items.csv", key="i"),
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
