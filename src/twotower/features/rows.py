"""Raw rows as plain values (a JSON body's) -> Arrow columns of a table's types.

``FeaturePipeline.transform`` reads Arrow columns typed as the fitted tables were
(an integer id column, a string text column). A row that arrives as plain values
(``{"age": 31, "genres": ["Drama"]}``) carries Python types that may not match: an
integer where the table holds floats, a float where it holds integers. Each value is
converted to the column's type where nothing is lost (31 -> 31.0 is, 25.5 -> an
integer is not); a value that does not convert is its row's error, never the batch's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from twotower.errors import DataError

# what a failed conversion raises, by how pyarrow (or Python) refuses the value
_REFUSED = (pa.ArrowException, TypeError, ValueError, OverflowError)


def rows_table(
    rows: list[Mapping[str, Any]],
    columns: list[str],
    schema: pa.Schema,
    check: Callable[[pa.Table], dict[int, DataError]] | None = None,
) -> tuple[pa.Table, dict[int, DataError]]:
    """The rows that convert, as a table of ``columns`` typed as in ``schema``; and
    each other row's error, by its position in ``rows``.

    A column a row leaves out (or gives as None) is null there: a missing value. A
    column ``schema`` lacks is null in every row.

    Args:
        rows: ``{column: value}`` per row; keys outside ``columns`` are not read.
        columns: the table's columns, in order.
        schema: the types to convert to (a side's stored table's schema).
        check: the converted rows -> each one refused (by its row in that table) with
            its error, such as ``FeaturePipeline.row_errors`` (a vector of another
            width); those rows are left out too.

    Returns:
        (table, errors): ``table`` holds the rows without an error, in order; an error
        names the column, the value and the type it does not convert to (or is
        ``check``'s).
    """
    arrays: dict[str, pa.Array] = {}
    errors: dict[int, DataError] = {}
    for column in columns:
        arrays[column] = _column(column, [row.get(column) for row in rows], schema, errors)
    if errors:
        kept = pa.array([index not in errors for index in range(len(rows))], pa.bool_())
        arrays = {name: array.filter(kept) for name, array in arrays.items()}
    table = pa.table(arrays)
    refused = check(table) if check is not None else {}
    if refused:
        positions = [index for index in range(len(rows)) if index not in errors]
        errors.update({positions[row]: error for row, error in refused.items()})
        table = table.filter(pa.array([row not in refused for row in range(table.num_rows)]))
    return table, errors


def column_type(schema: pa.Schema, column: str) -> pa.DataType:
    """The type of ``column`` in ``schema``; null for a column it lacks."""
    index = schema.get_field_index(column)
    return schema.field(index).type if index >= 0 else pa.null()


def _column(
    column: str, values: list[Any], schema: pa.Schema, errors: dict[int, DataError]
) -> pa.Array:
    """One column's values converted; a value that does not convert is null, its row's
    error recorded in ``errors`` (the first one per row)."""
    target = column_type(schema, column)
    try:
        return _convert(values, target)
    except _REFUSED:
        pass
    pieces = []
    for index, value in enumerate(values):  # the slow path, only when some value is bad
        try:
            pieces.append(_convert([value], target))
        except _REFUSED:
            pieces.append(pa.nulls(1, target))
            errors.setdefault(index, _refusal(column, value, target))
    return pa.concat_arrays(pieces) if pieces else pa.nulls(0, target)


def _refusal(column: str, value: Any, target: pa.DataType) -> DataError:
    """The error of a value that does not convert (a list of another width than a
    fixed-width column's said so)."""
    fixed = pa.types.is_fixed_size_list(target)
    if fixed and isinstance(value, list) and len(value) != target.list_size:
        return DataError(
            f"feature {column!r}: a list of {len(value)} values, where the column holds "
            f"lists of {target.list_size} ({target})"
        )
    return DataError(f"feature {column!r}: {value!r} is not a valid {target}")


def _convert(values: list[Any], target: pa.DataType) -> pa.Array:
    """``values`` as an array of ``target``, refusing lossy casts (25.5 -> int64)."""
    if pa.types.is_null(target):
        return pa.nulls(len(values))
    if all(value is None for value in values):  # what inferring then casting gives
        return pa.nulls(len(values), target)
    inferred = pa.array(values)
    return inferred if inferred.type == target else pc.cast(inferred, target, safe=True)
