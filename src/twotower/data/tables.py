"""Reading one table (CSV or Parquet) into columnar Arrow arrays, with precise errors.

Files are parsed by pyarrow, never row by row in Python. When pyarrow rejects a
file, the slow path re-reads just enough to name the file, the line and the
column at fault, so the user can go straight to the bad row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import re
from collections.abc import Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from twotower.data.config import TableSpec
from twotower.errors import DataError

log = logging.getLogger(__name__)

# A byte that never occurs in text data; multi-character delimiters ("::") become it.
_UNIT_SEPARATOR = "\x1f"
_CONVERSION_ERROR = re.compile(r"In CSV column #(\d+): .*CSV conversion error to (\S+): (.*)")


@dataclasses.dataclass(frozen=True)
class TableRead:
    """A table as read, with the number of malformed rows that were skipped."""

    table: pa.Table
    skipped_rows: int = 0


def read_table(spec: TableSpec, types: Mapping[str, pa.DataType] | None = None) -> TableRead:
    """Reads a table and checks that the columns in ``types`` exist and convert.

    Args:
        spec: where and how to read.
        types: required columns and the Arrow type each must convert to
            (``None`` as a type: the column must exist, its type is inferred).

    Returns:
        The table (typed columns cast) and the count of skipped rows.

    Raises:
        DataError: naming the file, line and column of the first problem.
    """
    types = dict(types or {})
    if not spec.path.exists():
        raise DataError(f"{spec.path}: file not found")
    result = _read_parquet(spec, types) if spec.is_parquet else _read_csv(spec, types)
    if result.skipped_rows:
        log.warning("%s: skipped %d malformed rows", spec.path, result.skipped_rows)
    return result


def require_columns(
    table: pa.Table, columns: list[str], source: object, delimiter: str | None = None
) -> None:
    """Raises ``DataError`` listing the available columns if any of ``columns`` is absent,
    and, for a CSV read with ``delimiter`` whose header holds another common one, says so."""
    missing = [c for c in columns if c not in table.column_names]
    if not missing:
        return
    hint = ""
    if delimiter is not None and len(table.column_names) == 1:
        header = table.column_names[0]
        other = next(
            (d for d in (";", "\t", "|", ",", "::") if d != delimiter and d in header), None
        )
        if other is not None:
            hint = (
                f"; the header is one column holding {other!r}: is the delimiter {other!r} "
                f"rather than {delimiter!r}? (set 'delimiter')"
            )
    raise DataError(
        f"{source}: column(s) {', '.join(map(repr, missing))} not found; "
        f"the file has: {', '.join(map(repr, table.column_names))}{hint}"
    )


def _read_parquet(spec: TableSpec, types: dict[str, pa.DataType | None]) -> TableRead:
    try:
        table = pq.read_table(spec.path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{spec.path}: not a readable Parquet file ({err})") from None
    require_columns(table, list(types), spec.path)
    for name, tp in types.items():
        if tp is None or table.schema.field(name).type == tp:
            continue
        column = table.column(name).combine_chunks()
        bad = first_failure(column, lambda a, tp=tp: pc.cast(a, tp))
        if bad is not None:
            raise DataError(
                f"{spec.path}: {position(spec, bad)}, column {name!r}: cannot convert "
                f"{_shown_value(column[bad].as_py())} to {tp}"
            )
        table = table.set_column(table.schema.get_field_index(name), name, pc.cast(column, tp))
    return TableRead(table)


def _read_csv(spec: TableSpec, types: dict[str, pa.DataType | None]) -> TableRead:
    lists = [name for name, tp in types.items() if tp is not None and pa.types.is_nested(tp)]
    if lists:
        raise DataError(
            f"{spec.path}: column {lists[0]!r} must hold lists ({types[lists[0]]}), which a "
            "CSV file cannot; write the table as Parquet"
        )
    data = _csv_bytes(spec)
    if not data.strip():
        raise DataError(f"{spec.path}: the file is empty")
    column_types = {k: v for k, v in types.items() if v is not None}
    if spec.skip_bad_rows:
        return _read_csv_skipping(spec, data, types, column_types)
    try:
        table = _parse_csv(spec, data, column_types)
    except pa.ArrowInvalid as err:
        raise _locate_csv_error(spec, data, column_types, err) from None
    require_columns(table, list(types), spec.path, spec.delimiter)
    _check_text_encoding(spec, table)
    return TableRead(table)


def _csv_bytes(spec: TableSpec) -> bytes:
    data = spec.path.read_bytes()
    if spec.encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
        try:
            data = data.decode(spec.encoding).encode("utf-8")
        except (UnicodeDecodeError, LookupError) as err:
            raise DataError(f"{spec.path}: cannot decode as {spec.encoding}: {err}") from None
    if len(spec.delimiter) > 1:
        data = data.replace(spec.delimiter.encode("utf-8"), _UNIT_SEPARATOR.encode())
    return data


def _delimiter(spec: TableSpec) -> str:
    return _UNIT_SEPARATOR if len(spec.delimiter) > 1 else spec.delimiter


def _parse_csv(
    spec: TableSpec,
    data: bytes,
    column_types: Mapping[str, pa.DataType],
    on_bad_row: Callable | None = None,
) -> pa.Table:
    read = pacsv.ReadOptions(
        column_names=None if spec.header else spec.columns,
        use_threads=on_bad_row is None,
    )
    quote = spec.quote_char if len(spec.delimiter) == 1 and spec.quote_char else False
    parse = pacsv.ParseOptions(
        delimiter=_delimiter(spec), quote_char=quote, invalid_row_handler=on_bad_row
    )
    convert = pacsv.ConvertOptions(column_types=dict(column_types))
    try:
        return pacsv.read_csv(io.BytesIO(data), read, parse, convert)
    except pa.ArrowInvalid as err:
        if "Empty CSV file" in str(err):
            raise DataError(f"{spec.path}: the file is empty") from None
        raise


def _locate_csv_error(
    spec: TableSpec, data: bytes, column_types: Mapping[str, pa.DataType], err: Exception
) -> DataError:
    """Turns pyarrow's message into one that names the line (and column)."""
    message = str(err)
    conversion = _CONVERSION_ERROR.search(message)
    if conversion:
        return _locate_conversion_error(spec, data, column_types, conversion)
    bad_rows: list[tuple[int | None, str]] = []

    def remember(row: pacsv.InvalidRow) -> str:
        bad_rows.append((row.number, row.text))
        return "skip"

    with contextlib.suppress(pa.ArrowInvalid):  # only the rows it reported matter here
        _parse_csv(spec, data, column_types, on_bad_row=remember)
    if bad_rows:
        number, text = bad_rows[0]
        expected = len(spec.columns) if spec.columns else "the header's"
        return DataError(
            f"{spec.path}, line {number}: wrong number of fields (expected {expected}): "
            f"{_shown(text, spec)}"
        )
    return DataError(f"{spec.path}: cannot parse as CSV: {message}")


def _locate_conversion_error(
    spec: TableSpec, data: bytes, column_types: Mapping[str, pa.DataType], match: re.Match
) -> DataError:
    as_text = _parse_as_text(spec, data, column_types)
    name = as_text.column_names[int(match.group(1))]
    target = column_types.get(name)
    column = as_text.column(name).combine_chunks()
    bad = first_failure(column, lambda a: pc.cast(a, target)) if target else None
    where = f", line {line_of(spec, bad)}" if bad is not None else ""
    value = column[bad].as_py() if bad is not None else match.group(3)
    return DataError(
        f"{spec.path}{where}, column {name!r}: cannot convert {value!r} to {match.group(2)}"
    )


def _read_csv_skipping(
    spec: TableSpec,
    data: bytes,
    types: dict[str, pa.DataType | None],
    column_types: dict[str, pa.DataType],
) -> TableRead:
    """Reads typed columns as text, then drops the rows that fail to parse or convert."""
    skipped = 0

    def skip(_row: pacsv.InvalidRow) -> str:
        nonlocal skipped
        skipped += 1
        return "skip"

    table = _parse_as_text(spec, data, column_types, on_bad_row=skip)
    require_columns(table, list(types), spec.path, spec.delimiter)
    keep = pa.array(np.ones(table.num_rows, dtype=bool))
    for name, tp in column_types.items():
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, _as_values(table.column(name).combine_chunks(), tp))
        keep = pc.and_(keep, _convertible(table.column(name).combine_chunks(), tp))
    skipped += table.num_rows - pc.sum(keep).as_py() if table.num_rows else 0
    table = table.filter(keep)
    for name, tp in column_types.items():
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, pc.cast(table.column(name), tp))
    return TableRead(table, skipped)


def _parse_as_text(
    spec: TableSpec,
    data: bytes,
    column_types: Mapping[str, pa.DataType],
    on_bad_row: Callable | None = None,
) -> pa.Table:
    """Parses with the typed columns as strings, reporting invalid UTF-8 in any of them."""
    # Parsed as bytes first: pyarrow fails on invalid UTF-8 in a string column
    # without saying where, while _check_text_encoding names the line.
    table = _parse_csv(spec, data, {k: pa.binary() for k in column_types}, on_bad_row)
    _check_text_encoding(spec, table)
    for name in column_types:
        if name in table.column_names:
            i = table.schema.get_field_index(name)
            table = table.set_column(i, name, pc.cast(table.column(name), pa.string()))
    return table


def _as_values(column: pa.Array, tp: pa.DataType) -> pa.Array:
    """A text column as pyarrow's CSV reader sees a numeric one: trimmed, null markers null."""
    if pa.types.is_string(tp) or pa.types.is_large_string(tp):
        return column
    column = pc.utf8_trim_whitespace(column)
    null_values = pa.array(pacsv.ConvertOptions().null_values, pa.string())
    return pc.if_else(pc.is_in(column, value_set=null_values), None, column)


def _convertible(column: pa.Array, tp: pa.DataType) -> pa.Array:
    """A boolean mask of the values of a trimmed text column that convert to ``tp``."""
    if pa.types.is_string(tp) or pa.types.is_large_string(tp):
        return pa.array(np.ones(len(column), dtype=bool))
    if pa.types.is_integer(tp):
        pattern = r"^-?\d+$"
    elif pa.types.is_floating(tp):
        pattern = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|infinity|nan)$"
    else:
        raise DataError(f"unsupported column type {tp} with skip_bad_rows")
    matches = pc.match_substring_regex(column, pattern, ignore_case=True)
    return pc.fill_null(matches, True)


def _check_text_encoding(spec: TableSpec, table: pa.Table) -> None:
    """pyarrow reads invalid UTF-8 as binary: report where, and suggest ``encoding``."""
    for name in table.column_names:
        column = table.column(name)
        if not pa.types.is_binary(column.type):
            continue
        column = column.combine_chunks()
        bad = first_failure(column, lambda a: pc.cast(a, pa.string()))
        if bad is None:
            continue
        raise DataError(
            f"{spec.path}, line {line_of(spec, bad)}, column {name!r}: bytes "
            f"{column[bad].as_py()[:40]!r} are not valid {spec.encoding}; "
            "set 'encoding' (for example latin-1) to the file's encoding"
        )


def _shown_value(value: object) -> str:
    """A value for an error message: a long list by its length and first values."""
    if isinstance(value, list) and len(value) > 4:
        return f"a list of {len(value)} values {str(value[:3])[:-1]}, ...]"
    return repr(value)


def position(spec: TableSpec, row: int) -> str:
    """Where data row ``row`` is, as a user finds it: a CSV line, or a Parquet row."""
    return f"row {row} (0-based)" if spec.is_parquet else f"line {line_of(spec, row)}"


def line_of(spec: TableSpec, row: int) -> int:
    """1-based line of data row ``row``; exact unless blank lines or quoted values
    spanning lines come before it."""
    return row + (2 if spec.header else 1)


def _shown(text: str | None, spec: TableSpec) -> str:
    text = (text or "").replace(_UNIT_SEPARATOR, spec.delimiter)
    return repr(text[:120])


def first_failure(array: pa.Array, op: Callable[[pa.Array], object]) -> int | None:
    """Index of the first element on which ``op`` fails, by bisection (O(log n) calls)."""
    try:
        op(array)
        return None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    lo, hi = 0, len(array)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            op(array.slice(lo, mid - lo))
            lo = mid
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            hi = mid
    return lo
