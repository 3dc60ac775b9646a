"""Raw rows as plain values -> Arrow columns of a stored table's types."""

import pyarrow as pa

from twotower.errors import DataError
from twotower.features.rows import column_type, rows_table

SCHEMA = pa.schema([("user", pa.int64()), ("age", pa.float64()), ("genres", pa.list_(pa.string()))])


def test_rows_convert_to_the_stored_types_and_left_out_columns_are_missing():
    rows = [{"user": 7, "age": 31, "genres": ["a"]}, {"user": 8.0}, {"age": None, "other": 1}]
    table, errors = rows_table(rows, ["user", "age", "genres"], SCHEMA)
    assert errors == {}
    assert table.schema == SCHEMA
    assert table.to_pylist() == [
        {"user": 7, "age": 31.0, "genres": ["a"]},
        {"user": 8, "age": None, "genres": None},
        {"user": None, "age": None, "genres": None},
    ]


def test_a_value_that_does_not_convert_is_its_rows_error_alone():
    rows = [{"user": 1}, {"user": 25.5, "age": "old"}, {"user": 3}, {"age": [1]}]
    table, errors = rows_table(rows, ["user", "age"], SCHEMA)
    assert sorted(errors) == [1, 3]
    assert all(isinstance(error, DataError) for error in errors.values())
    assert str(errors[1]) == "feature 'user': 25.5 is not a valid int64"  # the first one
    assert str(errors[3]) == "feature 'age': [1] is not a valid double"
    assert table.column("user").to_pylist() == [1, 3]


def test_a_column_the_schema_lacks_is_null_in_every_row():
    table, errors = rows_table([{"extra": 5}, {}], ["extra"], SCHEMA)
    assert errors == {} and table.column("extra").null_count == 2
    assert column_type(SCHEMA, "extra") == pa.null()
    assert column_type(SCHEMA, "age") == pa.float64()


def test_no_rows_give_an_empty_table_of_the_columns():
    table, errors = rows_table([], ["user", "age"], SCHEMA)
    assert errors == {} and table.num_rows == 0 and table.column_names == ["user", "age"]


def test_a_list_of_another_width_than_a_fixed_width_column_says_so():
    schema = pa.schema([("emb", pa.list_(pa.float32(), 3))])
    rows = [{"emb": [1, 2, 3]}, {"emb": [1.0, 2.0]}, {"emb": None}, {"emb": ["a", "b", "c"]}]
    table, errors = rows_table(rows, ["emb"], schema)
    assert sorted(errors) == [1, 3]
    assert str(errors[1]) == (
        "feature 'emb': a list of 2 values, where the column holds lists of 3 "
        "(fixed_size_list<item: float>[3])"
    )
    assert "['a', 'b', 'c'] is not a valid fixed_size_list" in str(errors[3])
    assert table.to_pylist() == [{"emb": [1.0, 2.0, 3.0]}, {"emb": None}]


def test_a_check_refuses_converted_rows_by_their_position_in_the_request():
    def odd_users(table: pa.Table) -> dict[int, DataError]:
        users = table.column("user").to_pylist()
        return {row: DataError(f"user {u} is odd") for row, u in enumerate(users) if u % 2}

    rows = [{"user": 2}, {"user": 2.5}, {"user": 3}, {"user": 4}, {"user": 5}]
    table, errors = rows_table(rows, ["user"], SCHEMA, check=odd_users)
    assert table.column("user").to_pylist() == [2, 4]
    assert {row: str(error) for row, error in errors.items()} == {
        1: "feature 'user': 2.5 is not a valid int64",
        2: "user 3 is odd",
        4: "user 5 is odd",
    }


def test_a_column_no_row_gives_is_null_of_the_stored_type():
    """A lone cold row leaves out most columns: each is nulls of its stored type."""
    table, errors = rows_table([{"age": 40}], ["user", "age", "genres"], SCHEMA)
    assert errors == {} and table.schema == SCHEMA
    assert table.to_pylist() == [{"user": None, "age": 40.0, "genres": None}]
    empty, _ = rows_table([], ["user", "genres"], SCHEMA)
    assert empty.num_rows == 0 and empty.schema == pa.schema([SCHEMA.field(0), SCHEMA.field(2)])
