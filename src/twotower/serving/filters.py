"""Filters on the item table's columns at query time: their syntax and checks, and the
mask of the items a filter keeps, cached per distinct filter.

A filter maps column names to conditions; every condition must hold (AND):

    {"category": {"in": ["toys", "games"]}, "price": {"gte": 5, "lt": 20}}

    in / not_in          the value is (is not) one of a list; text, integer, number or
                         boolean columns, and lists of those: a list column's row is
                         ``in`` when any of its elements is, ``not_in`` when none is
    gt / gte / lt / lte  the value is above / at least / below / at most a number;
                         integer and number columns

A null value (or a NaN) never satisfies a condition, ``not_in`` included; an empty
list satisfies ``not_in`` and never ``in``. ``FilterMasks.select`` checks a filter
against the columns (an error names the column and what is wrong with it) and gives
its (N,) bool mask over item rows, computed with ``pyarrow.compute`` over the whole
column once and kept in a bounded LRU cache, so a filter asked again costs a lookup.

The search takes the mask as its ``allowed`` items (``Catalogue.search``).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twotower.errors import DataError

SETS = ("in", "not_in")
RANGES = {"gt": pc.greater, "gte": pc.greater_equal, "lt": pc.less, "lte": pc.less_equal}
OPERATORS = (*SETS, *RANGES)
FILTER_CACHE_BYTES = 64 << 20  # the masks kept: 64 of a 1,000,000-item corpus
KINDS = {"text": "text", "integer": "integers", "number": "numbers", "boolean": "booleans"}
INT64 = 1 << 63


@dataclasses.dataclass(frozen=True)
class Column:
    """What a filter may ask of one item column: ``kind`` (text, integer, number or
    boolean) of its values, or of its lists' elements (``is_list``)."""

    name: str
    kind: str
    is_list: bool

    def describe(self) -> str:
        return f"{self.name!r} holds {'lists of ' if self.is_list else ''}{KINDS[self.kind]}"


@dataclasses.dataclass(frozen=True)
class Selection:
    """A checked filter: ``key`` (the same for equal filters, however written) and
    ``mask``, (N,) bool over item rows, read-only (it is shared through the cache)."""

    key: tuple
    mask: np.ndarray


class FilterMasks:
    """Checks filters against an item table and computes their masks, cached.

    Args:
        items: the item table (row i is item row i).
        cache_bytes: the most bytes the cached masks take (one byte per item each);
            the least recently used is dropped first. At least one is kept.
    """

    def __init__(self, items: pa.Table, cache_bytes: int = FILTER_CACHE_BYTES) -> None:
        self.items = items
        self.columns = {
            field.name: column
            for field in items.schema
            if (column := _column_of(field.name, field.type)) is not None
        }
        self.capacity = max(1, cache_bytes // max(items.num_rows, 1))
        self._cache: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def select(self, filter: Any) -> Selection:
        """The filter's checked key and its mask: from the cache, or computed now.

        Raises:
            DataError: the filter is not a non-empty mapping of filterable columns to
                conditions of their kind (the message names the column and the fault).
        """
        key = self.check(filter)
        with self._lock:
            mask = self._cache.get(key)
            if mask is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return Selection(key, mask)
            self.misses += 1
        mask = self._compute(key)
        with self._lock:
            self._cache[key] = mask
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return Selection(key, mask)

    def check(self, filter: Any) -> tuple:
        """The filter as a canonical key: ((column, operator, value), ...) sorted, set
        values as sorted tuples in the column's kind.

        Raises:
            DataError: as ``select``.
        """
        if not isinstance(filter, Mapping):
            raise DataError(
                f"filter must map column names to conditions, got {type(filter).__name__}"
            )
        if not filter:
            raise DataError("filter is empty: give at least one column's condition, or no filter")
        key = []
        for name, condition in filter.items():
            column = self.columns.get(name) if isinstance(name, str) else None
            if column is None:
                raise DataError(self._unknown(name))
            key.extend(_check_condition(column, condition))
        return tuple(sorted(key, key=lambda c: (c[0], c[1])))

    def _unknown(self, name: Any) -> str:
        """The error of a filter on a column that is not filterable (or not there)."""
        field = self.items.schema.field(name) if name in self.items.schema.names else None
        why = "no such column" if field is None else f"its type {field.type} is not filterable"
        return (
            f"filter on column {_shown(name)}: {why}; the filterable columns are "
            f"{', '.join(map(repr, self.columns))}"
        )

    def _compute(self, key: tuple) -> np.ndarray:
        """(N,) bool: the rows where every condition of ``key`` holds."""
        mask = np.ones(self.items.num_rows, dtype=bool)
        for name, operator, value in key:
            mask &= _holds(self.items.column(name), self.columns[name], operator, value)
        mask.flags.writeable = False
        return mask


def _column_of(name: str, type: pa.DataType) -> Column | None:
    """The filterable column of this name and type, or None when filters cannot read it."""
    is_list = pa.types.is_list(type) or pa.types.is_large_list(type)
    value = type.value_type if is_list else type
    if pa.types.is_dictionary(value):
        value = value.value_type
    if pa.types.is_string(value) or pa.types.is_large_string(value):
        kind = "text"
    elif pa.types.is_integer(value):
        kind = "integer"
    elif pa.types.is_floating(value):
        kind = "number"
    elif pa.types.is_boolean(value):
        kind = "boolean"
    else:
        return None
    return Column(name, kind, is_list)


def _check_condition(column: Column, condition: Any) -> list[tuple[str, str, Any]]:
    """One column's condition as (column, operator, value) triples, values checked.

    Raises:
        DataError: an operator that is not one of ``OPERATORS``, a range on a column
            that does not hold numbers, a value of the wrong kind.
    """
    where = f"filter on {column.name!r}"
    if not isinstance(condition, Mapping) or not condition:
        raise DataError(
            f"{where}: a condition maps one or more of {', '.join(OPERATORS)} to values, "
            f"got {_shown(condition)}"
        )
    checked = []
    for operator, value in condition.items():
        if operator not in OPERATORS:
            raise DataError(
                f"{where}: unknown operator {_shown(operator)}; use {', '.join(OPERATORS)}"
            )
        if operator in SETS:
            checked.append((column.name, operator, _check_set(column, operator, value, where)))
            continue
        if column.kind not in ("integer", "number") or column.is_list:
            raise DataError(
                f"{where}: {column.describe()}, and a range ({operator}) compares single "
                f"numbers; use in or not_in"
            )
        if not _is_number(value):
            raise DataError(f"{where}: {operator} takes a finite number, got {_shown(value)}")
        checked.append((column.name, operator, value))
    return checked


def _check_set(column: Column, operator: str, values: Any, where: str) -> tuple:
    """The values of ``in`` / ``not_in`` in the column's kind, sorted, each once."""
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__iter__"):
        raise DataError(f"{where}: {operator} takes a list of values, got {_shown(values)}")
    values = list(values)
    fits = {
        "text": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "integer": _is_number,
        "number": _is_number,
    }[column.kind]
    wrong = [v for v in values if not fits(v)]
    if wrong:
        wanted = KINDS[column.kind] if column.kind != "integer" else "numbers"
        raise DataError(
            f"{where}: {column.describe()}, so {operator} takes {wanted}; got {_shown(wrong[0])}"
        )
    if column.kind == "integer":  # a number with a fraction is no integer's value
        values = [int(v) for v in values if float(v).is_integer() and -INT64 <= v < INT64]
    elif column.kind == "number":
        values = [float(v) for v in values]
    return tuple(sorted(set(values)))


def _shown(value: Any) -> str:
    """``repr(value)``, cut to 80 characters: a message names a value, not a whole list."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(value: Any) -> bool:
    """An int or a finite float, not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return isinstance(value, (int, np.integer)) or math.isfinite(value)


def _holds(values: pa.ChunkedArray, column: Column, operator: str, value: Any) -> np.ndarray:
    """(N,) bool: the rows of ``values`` where ``operator value`` holds (never a null)."""
    values = _decoded(values.combine_chunks())
    if column.is_list:
        return _holds_any(values, column, operator, value)
    valid = _present(values)
    values = _canonical(values)
    if operator in SETS:
        found = _numpy(pc.is_in(values, value_set=pa.array(value, type=values.type)))
        return valid & (found if operator == "in" else ~found)
    bound = value
    if isinstance(value, int) and not -INT64 <= value < INT64:  # compared as a float
        bound = (math.inf if value > 0 else -math.inf) if abs(value) >= 2**1023 else float(value)
    return valid & _numpy(pc.fill_null(RANGES[operator](values, bound), False))


def _holds_any(values: pa.Array, column: Column, operator: str, value: tuple) -> np.ndarray:
    """(N,) bool for a list column: ``in`` where any element is in the set, ``not_in``
    where the list is present and none is."""
    flat = _decoded(values.flatten())  # the present lists' elements
    parents = pc.list_parent_indices(values).to_numpy()
    flat = _canonical(flat)
    found = _numpy(pc.is_in(flat, value_set=pa.array(value, type=flat.type)))
    any_found = np.zeros(len(values), dtype=bool)
    any_found[parents[found & _present(flat)]] = True
    if operator == "in":
        return any_found
    return _numpy(pc.is_valid(values)) & ~any_found


def _decoded(values: pa.Array) -> pa.Array:
    """Dictionary-encoded values as plain ones."""
    return values.dictionary_decode() if pa.types.is_dictionary(values.type) else values


def _present(values: pa.Array) -> np.ndarray:
    """(N,) bool: neither null nor NaN."""
    present = _numpy(pc.is_valid(values))
    if pa.types.is_floating(values.type):
        present &= ~_numpy(pc.fill_null(pc.is_nan(values), True))
    return present


def _canonical(values: pa.Array) -> pa.Array:
    """Numbers as int64 or float64, the types sets and bounds are compared in (uint64:
    float64, its values past int64 rounded)."""
    if values.type == pa.uint64():
        return pc.cast(values, pa.float64(), safe=False)
    if pa.types.is_integer(values.type) and values.type != pa.int64():
        return pc.cast(values, pa.int64())
    if pa.types.is_floating(values.type) and values.type != pa.float64():
        return pc.cast(values, pa.float64())
    return values


def _numpy(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A bool arrow array as numpy, nulls as False."""
    return pc.fill_null(values, False).to_numpy(zero_copy_only=False)
