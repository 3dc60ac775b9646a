"""Dataset.from_tables (keys, linking, missing feature rows) and load_dataset from files."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from twotower.data.config import (
    DataConfig,
    FeatureTableConfig,
    InteractionsConfig,
    SplitConfig,
    TableSpec,
)
from twotower.data.dataset import ITEM_IDX, QUERY_IDX, SPLIT, WEIGHT, Dataset
from twotower.data.load import load_dataset
from twotower.data.splits import split_interactions
from twotower.errors import DataError


def _interactions(query_ids: list, item_ids: list) -> pa.Table:
    return pa.table({"query_id": query_ids, "item_id": item_ids})


def _linked_keys(dataset: Dataset) -> tuple[list, list]:
    """The feature-table key each interaction points at through its indices."""
    queries = dataset.queries.column(dataset.query_key).take(dataset.column(QUERY_IDX))
    items = dataset.items.column(dataset.item_key).take(dataset.column(ITEM_IDX))
    return queries.to_pylist(), items.to_pylist()


# ---- from_tables -----------------------------------------------------------------------


def test_indices_point_at_the_feature_rows() -> None:
    # The side tables are in an order of their own; the indices must follow them.
    interactions = _interactions(["u2", "u1", "u2", "u3"], ["b", "c", "a", "b"])
    queries = pa.table({"user": ["u3", "u1", "u2"], "age": [30, 10, 20]})
    items = pa.table({"item_id": ["c", "a", "b", "d"], "price": [3.0, 1.0, 2.0, 4.0]})
    dataset = Dataset.from_tables(interactions, queries, items, query_key="user")
    assert dataset.column(QUERY_IDX).tolist() == [2, 1, 2, 0]
    assert dataset.column(ITEM_IDX).tolist() == [2, 0, 1, 2]
    assert _linked_keys(dataset) == (["u2", "u1", "u2", "u3"], ["b", "c", "a", "b"])
    assert dataset.num_queries == 3
    assert dataset.num_items == 4  # item "d" has no interaction but is in the corpus
    assert dataset.interactions.schema.field(QUERY_IDX).type == pa.int64()


def test_without_feature_tables_the_ids_are_the_tables() -> None:
    dataset = Dataset.from_tables(_interactions([5, 3, 5], [9, 9, 7]))
    assert dataset.queries.column("query_id").to_pylist() == [3, 5]
    assert dataset.items.column("item_id").to_pylist() == [7, 9]
    assert _linked_keys(dataset) == ([5, 3, 5], [9, 9, 7])


def test_int_interaction_ids_meet_string_feature_keys() -> None:
    interactions = _interactions([1, 2, 1], [10, 20, 30])
    queries = pa.table({"user_id": ["2", "1"]})
    items = pa.table({"item_id": ["30", "20", "10"]})
    dataset = Dataset.from_tables(interactions, queries, items, query_key="user_id")
    assert dataset.interactions.schema.field("query_id").type == pa.string()
    assert dataset.interactions.schema.field("item_id").type == pa.string()
    assert _linked_keys(dataset) == (["1", "2", "1"], ["10", "20", "30"])


def test_string_interaction_ids_meet_int_feature_keys() -> None:
    dataset = Dataset.from_tables(_interactions(["1"], ["7"]), items=pa.table({"item_id": [7, 8]}))
    assert dataset.interactions.schema.field("item_id").type == pa.int64()
    assert dataset.column(ITEM_IDX).tolist() == [0]


def test_ids_that_do_not_convert_to_the_key_type() -> None:
    with pytest.raises(
        DataError, match="item_id 'abc' is string, and the item feature table's keys are int64"
    ):
        Dataset.from_tables(_interactions([1], ["abc"]), items=pa.table({"item_id": [1]}))


def test_duplicate_feature_key_names_the_value() -> None:
    items = pa.table({"item_id": ["a", "b", "a"], "price": [1.0, 2.0, 3.0]})
    with pytest.raises(DataError) as err:
        Dataset.from_tables(_interactions([1], ["a"]), items=items)
    assert "one row per 'item_id'" in str(err.value)
    assert "'a' appears 2 times" in str(err.value)


def test_null_feature_key() -> None:
    with pytest.raises(DataError, match="1 row\\(s\\) with no 'user'"):
        Dataset.from_tables(
            _interactions([1], [1]), pa.table({"user": [1, None]}), query_key="user"
        )


@pytest.mark.parametrize("column", ["query_id", "item_id"])
def test_null_interaction_id_names_the_row(column: str) -> None:
    table = _interactions([1, 2, 3], [4, 5, 6])
    table = table.set_column(
        table.schema.get_field_index(column), column, pa.array([1, None, 3], pa.int64())
    )
    with pytest.raises(DataError) as err:
        Dataset.from_tables(table, name="mine")
    assert f"mine: 1 interaction(s) have an empty {column}" in str(err.value)
    assert "interaction row 1" in str(err.value)


def test_empty_interactions() -> None:
    empty = pa.table({"query_id": pa.array([], pa.int64()), "item_id": pa.array([], pa.int64())})
    with pytest.raises(DataError, match="mine: the interactions table has no rows"):
        Dataset.from_tables(empty, name="mine")


def test_interactions_without_an_id_column() -> None:
    with pytest.raises(DataError, match="lacks column"):
        Dataset.from_tables(pa.table({"query_id": [1], "movie": [2]}))


def test_missing_feature_rows_error_suggests_the_options() -> None:
    interactions = _interactions([1, 1, 2], ["a", "x", "y"])
    with pytest.raises(DataError) as err:
        Dataset.from_tables(interactions, items=pa.table({"item_id": ["a", "b"]}))
    message = str(err.value)
    assert "2 item id(s)" in message
    assert "'x', 'y'" in message
    assert "on_missing_rows" in message
    assert "'impute'" in message
    assert "'drop'" in message


def test_missing_feature_rows_imputed_with_null_features() -> None:
    interactions = _interactions([1, 1, 2], ["a", "x", "a"])
    items = pa.table({"item_id": ["a", "b"], "price": [1.0, 2.0]})
    dataset = Dataset.from_tables(interactions, items=items, on_missing_rows="impute")
    assert dataset.interactions.num_rows == 3
    assert dataset.items.to_pydict() == {"item_id": ["a", "b", "x"], "price": [1.0, 2.0, None]}
    assert dataset.items.schema == items.schema
    assert _linked_keys(dataset)[1] == ["a", "x", "a"]


def test_missing_feature_rows_dropped_with_their_interactions() -> None:
    interactions = _interactions([1, 2, 3, 1], ["a", "x", "b", "y"])
    queries = pa.table({"query_id": [1, 2]})
    items = pa.table({"item_id": ["a", "b", "x"]})
    dataset = Dataset.from_tables(interactions, queries, items, on_missing_rows="drop")
    # Query 3 has no row (drops "b"); item "y" has no row (drops it).
    assert dataset.interactions.column("query_id").to_pylist() == [1, 2]
    assert _linked_keys(dataset) == ([1, 2], ["a", "x"])
    assert dataset.num_queries == 2
    assert dataset.num_items == 3


def test_dropping_every_interaction_is_an_error() -> None:
    with pytest.raises(DataError, match="no interactions are left"):
        Dataset.from_tables(
            _interactions([1], [9]), items=pa.table({"item_id": [1]}), on_missing_rows="drop"
        )


def test_stale_indices_are_recomputed() -> None:
    interactions = _interactions([1, 2], [3, 4]).append_column(QUERY_IDX, pa.array([7, 7]))
    dataset = Dataset.from_tables(interactions)
    assert dataset.column(QUERY_IDX).tolist() == [0, 1]


# ---- load_dataset from files -----------------------------------------------------------


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _roles(path: Path, **kwargs: object) -> InteractionsConfig:
    return InteractionsConfig(
        path=path, query_id="user", item_id="movie", timestamp="ts", weight="stars", **kwargs
    )


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {
        "train": _write(
            tmp_path / "train.csv",
            ["user,movie,stars,ts", "u1,10,5,100", "u1,20,2,101", "u2,10,4,102", "u2,30,1,103"],
        ),
        "valid": _write(tmp_path / "valid.csv", ["user,movie,stars,ts", "u1,30,4,200"]),
        "test": _write(tmp_path / "test.csv", ["user,movie,stars,ts", "u2,20,5,300"]),
        "users": _write(tmp_path / "users.csv", ["uid,age", "u2,40", "u1,20"]),
        "movies": _write(
            tmp_path / "movies.csv", ["mid,title,price", "30,C,3.5", "10,A,1.5", "20,B,2.5"]
        ),
    }


def _config(files: dict[str, Path], **kwargs: object) -> DataConfig:
    return DataConfig(
        source="files",
        interactions=_roles(files["train"]),
        queries=FeatureTableConfig(path=files["users"], key="uid"),
        items=FeatureTableConfig(path=files["movies"], key="mid"),
        **kwargs,
    )


def test_load_files_renames_role_columns(files: dict[str, Path]) -> None:
    dataset = load_dataset(_config(files), {"age": pa.float64()}, {"price": pa.float64()})
    assert dataset.interactions.column_names == [
        "query_id",
        "item_id",
        "timestamp",
        "weight",
        QUERY_IDX,
        ITEM_IDX,
    ]
    assert dataset.interactions.column("weight").to_pylist() == [5.0, 2.0, 4.0, 1.0]
    assert dataset.interactions.column("timestamp").to_pylist() == [100, 101, 102, 103]
    assert dataset.has_timestamps
    assert _linked_keys(dataset) == (["u1", "u1", "u2", "u2"], [10, 20, 10, 30])
    assert dataset.queries.schema.field("age").type == pa.float64()
    assert dataset.name == str(files["train"])


def test_load_given_split_files(files: dict[str, Path]) -> None:
    config = _config(
        files, valid=TableSpec(path=files["valid"]), test=TableSpec(path=files["test"])
    )
    dataset = load_dataset(config)
    assert dataset.column(SPLIT).tolist() == [0, 0, 0, 0, 1, 2]
    split = split_interactions(dataset, SplitConfig(method="given"))
    assert split.train.num_rows == 4
    assert split.valid.to_pydict()["query_id"] == ["u1"]
    assert split.valid.to_pydict()["item_id"] == [30]
    assert split.test.to_pydict()["timestamp"] == [300]


def test_load_valid_without_test(files: dict[str, Path]) -> None:
    with pytest.raises(DataError, match="both data.valid and data.test"):
        load_dataset(_config(files, valid=TableSpec(path=files["valid"])))


def test_load_min_weight_filters(files: dict[str, Path]) -> None:
    dataset = load_dataset(_config(files, min_weight=4.0))
    assert dataset.column(WEIGHT).tolist() == [5.0, 4.0]
    assert _linked_keys(dataset) == (["u1", "u2"], [10, 10])
    assert dataset.num_items == 3  # the corpus is kept whole


def test_min_weight_without_weights(tmp_path: Path) -> None:
    path = _write(tmp_path / "i.csv", ["user,movie", "1,2"])
    config = DataConfig(
        source="files",
        interactions=InteractionsConfig(path, query_id="user", item_id="movie"),
        min_weight=1.0,
    )
    with pytest.raises(DataError, match="no weight column"):
        load_dataset(config)


def test_load_dense_column_with_text_names_the_line(files: dict[str, Path]) -> None:
    _write(files["movies"], ["mid,title,price", "30,C,3.5", "10,A,cheap", "20,B,2.5"])
    with pytest.raises(DataError) as err:
        load_dataset(_config(files), item_columns={"price": pa.float64()})
    message = str(err.value)
    assert str(files["movies"]) in message
    assert "line 3" in message
    assert "column 'price'" in message
    assert "'cheap'" in message


def test_load_feature_column_absent(files: dict[str, Path]) -> None:
    with pytest.raises(DataError, match="'genre' not found"):
        load_dataset(_config(files), item_columns={"genre": None})


def test_load_feature_columns_without_a_feature_table(files: dict[str, Path]) -> None:
    config = DataConfig(source="files", interactions=_roles(files["train"]))
    with pytest.raises(
        DataError,
        match=r"the item features use column\(s\) \['price'\], but no item feature table is "
        r"configured \(data.items\); without one they can read only the interactions' item "
        r"id column 'movie'",
    ):
        load_dataset(config, item_columns={"price": pa.float64(), "movie": None})


def test_a_side_of_ids_alone_needs_no_feature_table(files: dict[str, Path]) -> None:
    """Features reading only a side's id column (an id embedding; a history keyed by the
    query id) take the ids from the interactions."""
    config = DataConfig(source="files", interactions=_roles(files["train"]))
    dataset = load_dataset(config, query_columns={"user": None}, item_columns={"movie": None})
    assert dataset.queries.column("user").to_pylist() == ["u1", "u2"]
    assert dataset.items.column("movie").to_pylist() == [10, 20, 30]
    queries = [
        dataset.queries["user"][i].as_py() for i in dataset.interactions[QUERY_IDX].to_pylist()
    ]
    assert queries == ["u1", "u1", "u2", "u2"]


def test_load_text_timestamps_are_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path / "i.csv", ["user,movie,stars,ts", "1,2,3,yesterday"])
    with pytest.raises(
        DataError, match=r"line 2, column 'ts' \(the timestamp\): 'yesterday' is not a number"
    ):
        load_dataset(DataConfig(source="files", interactions=_roles(path)))


def test_load_header_only_interactions(tmp_path: Path) -> None:
    path = _write(tmp_path / "i.csv", ["user,movie,stars,ts"])
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(source="files", interactions=_roles(path)))
    assert str(path) in str(err.value)
    assert "the table has no rows" in str(err.value)


def test_load_files_without_interactions() -> None:
    with pytest.raises(DataError, match="needs data.interactions"):
        load_dataset(DataConfig(source="files"))


def test_load_adapter_without_path() -> None:
    with pytest.raises(DataError, match="needs data.path"):
        load_dataset(DataConfig(source="movielens-100k"))
