"""read_table: CSV and Parquet, typed columns, and a corpus of bad inputs whose errors
must name the file, the line (CSV, 1-based, the header is line 1) or row (Parquet),
and the column at fault."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twotower.data.config import TableSpec
from twotower.data.tables import read_table
from twotower.errors import DataError


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def _error(spec: TableSpec, types: dict | None = None) -> str:
    with pytest.raises(DataError) as err:
        read_table(spec, types)
    return str(err.value)


# ---- reading ---------------------------------------------------------------------------


def test_csv_with_typed_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", "user,score,name\n1,2.5,ann\n2,3,bob\n")
    read = read_table(TableSpec(path), {"user": pa.int64(), "score": pa.float64(), "name": None})
    assert read.skipped_rows == 0
    assert read.table.schema.field("user").type == pa.int64()
    assert read.table.schema.field("score").type == pa.float64()
    assert read.table.to_pydict() == {"user": [1, 2], "score": [2.5, 3.0], "name": ["ann", "bob"]}


def test_typed_column_forces_a_type_inference_would_not_choose(tmp_path: Path) -> None:
    # A zip code read as text keeps its leading zero; as a float the user's ids are cast.
    path = _write(tmp_path / "t.csv", "zip,user\n01234,1\n99999,2\n")
    table = read_table(TableSpec(path), {"zip": pa.string(), "user": pa.float64()}).table
    assert table.column("zip").to_pylist() == ["01234", "99999"]
    assert table.column("user").to_pylist() == [1.0, 2.0]


def test_empty_numeric_values_are_null(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", "a,b\n1,\n2,3\n")
    table = read_table(TableSpec(path), {"b": pa.float64()}).table
    assert table.column("b").to_pylist() == [None, 3.0]


def test_multi_character_delimiter_without_header(tmp_path: Path) -> None:
    path = _write(tmp_path / "ratings.dat", "1::10::5::978300760\n2::20::3::978300761\n")
    spec = TableSpec(path, delimiter="::", header=False, columns=["u", "i", "r", "t"])
    table = read_table(spec, {"u": pa.int64(), "r": pa.float64()}).table
    assert table.column_names == ["u", "i", "r", "t"]
    assert table.to_pydict() == {
        "u": [1, 2],
        "i": [10, 20],
        "r": [5.0, 3.0],
        "t": [978300760, 978300761],
    }


def test_multi_character_delimiter_keeps_quote_characters(tmp_path: Path) -> None:
    # "::" files are read without quoting: a quote is an ordinary character.
    path = _write(tmp_path / "movies.dat", 'id::title\n1::"Heat" (1995)\n')
    table = read_table(TableSpec(path, delimiter="::"), {"id": pa.int64()}).table
    assert table.column("title").to_pylist() == ['"Heat" (1995)']


def test_latin1_encoding(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.dat", "id::title\n1::Café\n2::Naïve\n".encode("latin-1"))
    spec = TableSpec(path, delimiter="::", encoding="latin-1")
    table = read_table(spec, {"id": pa.int64(), "title": pa.string()}).table
    assert table.column("title").to_pylist() == ["Café", "Naïve"]


def test_parquet_file_with_cast(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": pa.array([1, 2], pa.int32()), "name": ["a", "b"]}), path)
    table = read_table(TableSpec(path), {"id": pa.int64(), "name": None}).table
    assert table.schema.field("id").type == pa.int64()
    assert table.to_pydict() == {"id": [1, 2], "name": ["a", "b"]}


def test_folder_of_parquet_files(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.table({"id": [1, 2], "x": [0.5, 1.5]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"id": [3], "x": [2.5]}), folder / "part-1.parquet")
    spec = TableSpec(folder)
    assert spec.is_parquet
    table = read_table(spec, {"id": pa.int64(), "x": pa.float64()}).table
    assert sorted(table.column("id").to_pylist()) == [1, 2, 3]
    assert table.num_rows == 3


def test_format_overrides_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    pq.write_table(pa.table({"id": [7]}), path)
    assert read_table(TableSpec(path, format="parquet")).table.to_pydict() == {"id": [7]}


# ---- the bad-input corpus --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "shown"),
    [
        ("a,b,c\n1,2,3\n4,5\n6,7,8\n", 3, "'4,5'"),  # too few fields
        ("a,b,c\n1,2,3\n4,5,6\n7,8,9,10\n", 4, "'7,8,9,10'"),  # too many fields
    ],
)
def test_wrong_field_count_names_the_line(tmp_path: Path, text: str, line: int, shown: str) -> None:
    path = _write(tmp_path / "t.csv", text)
    message = _error(TableSpec(path), {"a": pa.int64()})
    assert str(path) in message
    assert f"line {line}:" in message
    assert "wrong number of fields" in message
    assert shown in message


def test_wrong_field_count_with_multi_character_delimiter_shows_the_original_line(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path / "t.dat", "1::2::3\n4::5\n")
    spec = TableSpec(path, delimiter="::", header=False, columns=["a", "b", "c"])
    message = _error(spec)
    assert "line 2:" in message
    assert "expected 3" in message
    assert "'4::5'" in message


def test_non_numeric_value_names_line_column_and_value(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", "user,rating\n1,4\n2,5\n3,five\n4,1\n")
    message = _error(TableSpec(path), {"user": pa.int64(), "rating": pa.float64()})
    assert str(path) in message
    assert "line 4" in message
    assert "column 'rating'" in message
    assert "'five'" in message


def test_non_integer_value_in_integer_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", "user,rating\n1,4\n2.5,5\n")
    message = _error(TableSpec(path), {"user": pa.int64()})
    assert "line 3" in message
    assert "column 'user'" in message
    assert "'2.5'" in message


def test_invalid_utf8_names_line_column_and_suggests_encoding(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", b"id,title\n1,Heat\n2,Caf\xe9\n")
    message = _error(TableSpec(path), {"id": pa.int64()})
    assert str(path) in message
    assert "line 3" in message
    assert "column 'title'" in message
    assert "'encoding'" in message
    assert "latin-1" in message


def test_invalid_utf8_in_a_string_typed_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", b"id,title\n1,Heat\n2,Caf\xe9\n")
    message = _error(TableSpec(path), {"id": pa.int64(), "title": pa.string()})
    assert "line 3" in message
    assert "column 'title'" in message
    assert "'encoding'" in message


def test_absent_column_lists_the_existing_ones(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", "user_id,movie_id\n1,2\n")
    message = _error(TableSpec(path), {"item_id": None})
    assert str(path) in message
    assert "'item_id' not found" in message
    assert "'user_id', 'movie_id'" in message


def test_absent_column_in_parquet_lists_the_existing_ones(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"user_id": [1]}), path)
    message = _error(TableSpec(path), {"item_id": pa.int64()})
    assert str(path) in message
    assert "'item_id' not found" in message
    assert "'user_id'" in message


@pytest.mark.parametrize("text", ["", "\n\n", "   \n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path / "t.csv", text)
    message = _error(TableSpec(path), {"a": None})
    assert message == f"{path}: the file is empty"


def test_header_only_file_with_a_required_column_reads_no_rows(tmp_path: Path) -> None:
    # Not an error at this level: the header is valid and names the column. A table
    # that must not be empty (the interactions) is rejected by the data model, with
    # the file's name: see test_dataset.py::test_load_header_only_interactions.
    path = _write(tmp_path / "t.csv", "user,rating\n")
    table = read_table(TableSpec(path), {"user": pa.int64(), "rating": pa.float64()}).table
    assert table.num_rows == 0
    assert table.schema.field("user").type == pa.int64()
    assert table.schema.field("rating").type == pa.float64()


def test_header_only_file_without_the_required_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", "user,rating\n")
    message = _error(TableSpec(path), {"item": pa.int64()})
    assert str(path) in message
    assert "'item' not found" in message
    assert "'user', 'rating'" in message


@pytest.mark.parametrize("name", ["missing.csv", "missing.parquet"])
def test_file_not_found(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    assert _error(TableSpec(path)) == f"{path}: file not found"


def test_parquet_cast_failure_names_row_and_column(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": ["1", "2", "x3", "4"]}), path)
    message = _error(TableSpec(path), {"id": pa.int64()})
    assert str(path) in message
    assert "row 2" in message  # the 0-based row index
    assert "column 'id'" in message
    assert "'x3'" in message


def test_unreadable_parquet(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.parquet", b"this is not parquet")
    message = _error(TableSpec(path))
    assert str(path) in message
    assert "not a readable Parquet file" in message


def test_undecodable_with_the_given_encoding(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", b"a\n\xff\xfe\n")
    message = _error(TableSpec(path, encoding="ascii"))
    assert str(path) in message
    assert "cannot decode as ascii" in message


# ---- skip_bad_rows ---------------------------------------------------------------------


def test_skip_bad_rows_drops_exactly_the_bad_rows(tmp_path: Path) -> None:
    lines = [
        "user,rating,note",
        "1,4.5,good",
        "2,3",  # too few fields
        "3,x,bad value",  # non-numeric rating
        "4,5,good",
        "5,1,too,many",  # too many fields
        "six,2,non-numeric user",
        "7,,missing rating is not bad",
        " 8 , 2 ,spaces around numbers",
        "9,NA,a null marker",
        "+10,1,a sign the reader rejects for integers",
    ]
    path = _write(tmp_path / "t.csv", "\n".join(lines) + "\n")
    read = read_table(
        TableSpec(path, skip_bad_rows=True), {"user": pa.int64(), "rating": pa.float64()}
    )
    assert read.skipped_rows == 5
    assert read.table.schema.field("user").type == pa.int64()
    assert read.table.schema.field("rating").type == pa.float64()
    assert read.table.to_pydict() == {
        "user": [1, 4, 7, 8, 9],
        "rating": [4.5, 5.0, None, 2.0, None],
        "note": [
            "good",
            "good",
            "missing rating is not bad",
            "spaces around numbers",
            "a null marker",
        ],
    }


def test_skip_bad_rows_keeps_what_a_strict_read_keeps(tmp_path: Path) -> None:
    # On a file without bad rows, skipping changes nothing.
    text = "a,b,c\n1,2.5,x\n,3e2,y\n-4, inf ,\n5,NaN,z\n"
    path = _write(tmp_path / "t.csv", text)
    types = {"a": pa.int64(), "b": pa.float64()}
    strict = read_table(TableSpec(path), types)
    lenient = read_table(TableSpec(path, skip_bad_rows=True), types)
    assert lenient.skipped_rows == 0
    assert lenient.table.to_pydict() == strict.table.to_pydict()


def test_skip_bad_rows_still_reports_invalid_utf8(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", b"id,title\n1,Heat\n2,Caf\xe9\n")
    message = _error(TableSpec(path, skip_bad_rows=True), {"id": pa.int64(), "title": pa.string()})
    assert "column 'title'" in message
    assert "'encoding'" in message


# ---- a bad row deep in a large file: pyarrow reads it in parallel blocks ---------------

_DEEP_ROWS = 100_000  # data rows before the bad one: it is on line 100,002


@pytest.fixture(scope="module")
def deep_rows() -> bytes:
    return "".join(f"{i},{i % 7},name{i}\n" for i in range(_DEEP_ROWS)).encode()


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (b"5,6\n", ["line 100002:", "wrong number of fields"]),
        (b"5,6,7,8\n", ["line 100002:", "wrong number of fields"]),
        (b"5,x,7\n", ["line 100002,", "column 'b'", "'x'"]),
        (b"5,6,caf\xe9\n", ["line 100002,", "column 'c'", "'encoding'"]),
    ],
)
def test_bad_row_deep_in_a_large_file(
    tmp_path: Path, deep_rows: bytes, bad: bytes, expected: list[str]
) -> None:
    path = _write(tmp_path / "big.csv", b"a,b,c\n" + deep_rows + bad + deep_rows[:5000])
    message = _error(TableSpec(path), {"a": pa.int64(), "b": pa.int64()})
    for part in expected:
        assert part in message


def test_skip_bad_rows_deep_in_a_large_file(tmp_path: Path, deep_rows: bytes) -> None:
    path = _write(tmp_path / "big.csv", b"a,b,c\n" + deep_rows + b"5,6\n1,x,2\n" + deep_rows)
    read = read_table(TableSpec(path, skip_bad_rows=True), {"a": pa.int64(), "b": pa.int64()})
    assert read.skipped_rows == 2
    assert read.table.num_rows == 2 * _DEEP_ROWS
