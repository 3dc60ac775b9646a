"""A change of the catalogue as ``POST /admin/items`` gives it, checked against the
artifact it applies to.

The body holds raw item rows to add or replace (``upsert``: the item key and every
column the item features read, as the item table holds them) and item ids to
``block``, ``unblock`` or ``remove``. ``checked_change`` turns it into an
``ItemChange``: the rows typed as the item table's columns (lossless conversions
only, ``features/rows.py``), the ids as the table spells them. A change is taken
whole or not at all: every problem is named, by list, position, column and value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from twotower.errors import DataError
from twotower.features.rows import rows_table
from twotower.serving.artifact import Artifact

MAX_NAMED = 20  # problems a refusal names; the rest are counted
# lists of a change that may not name one id both
EXCLUSIVE = [("block", "unblock"), ("upsert", "remove"), ("block", "remove"), ("unblock", "remove")]


class ChangeError(DataError):
    """A change refused whole; the message names each problem (up to ``MAX_NAMED``)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        named = "; ".join(problems[:MAX_NAMED])
        more = len(problems) - MAX_NAMED
        super().__init__(named + (f"; and {more} more" if more > 0 else ""))


@dataclasses.dataclass(frozen=True)
class ItemChange:
    """A checked change of the catalogue.

    Attributes:
        rows: the items to add or replace, typed as the item table (its columns, in its
            order; a column the features do not read and the row left out is null).
        added: how many of ``rows`` are new ids; the others replace an item.
        block: ids to block (kept, never returned), as the item table spells them.
        unblock: ids to serve again.
        remove: ids to remove (unknown afterwards).
    """

    rows: pa.Table
    added: int
    block: list[Any]
    unblock: list[Any]
    remove: list[Any]

    @property
    def replaced(self) -> int:
        return self.rows.num_rows - self.added


def checked_change(
    artifact: Artifact,
    upsert: Sequence[Mapping[str, Any]] = (),
    block: Sequence[Any] = (),
    unblock: Sequence[Any] = (),
    remove: Sequence[Any] = (),
) -> ItemChange:
    """``upsert``, ``block``, ``unblock`` and ``remove`` checked against ``artifact``.

    An id may be blocked (or unblocked) in the change that adds it; no id may be in
    two of the lists, except ``upsert`` with ``block`` or ``unblock``.

    Raises:
        ChangeError: a row without its key, with an unknown column, without a column
            the item features read, or with a value that does not convert to its
            column's type; a key twice among the rows; an id to block, unblock or
            remove that the artifact does not hold; an id in two lists. Each named.
    """
    problems: list[str] = []
    rows, keys = _rows(artifact, upsert, problems)
    lists = {"block": block, "unblock": unblock, "remove": remove}
    # as the table spells them, each once (an id given twice is the same request)
    ids = {
        name: list(dict.fromkeys(artifact.item_keys.canonical(list(values))))
        for name, values in lists.items()
    }
    new = set(keys) - set(_known(artifact, keys))
    for name, values in ids.items():
        _check_ids(artifact, name, values, new if name != "remove" else set(), problems)
    _check_overlaps({"upsert": keys, **ids}, problems)
    if problems:
        raise ChangeError(problems)
    return ItemChange(rows, len(new), ids["block"], ids["unblock"], ids["remove"])


def _rows(
    artifact: Artifact, upsert: Sequence[Mapping[str, Any]], problems: list[str]
) -> tuple[pa.Table, list[Any]]:
    """The upserted rows as a table of the item table's schema, and the keys of those
    that convert; each row's problem added to ``problems``."""
    schema, key = artifact.items.schema, artifact.item_key
    needed = list(dict.fromkeys([key, *artifact.pipeline.input_columns("item")]))
    table, errors = rows_table(list(upsert), schema.names, schema)
    wrong = {position: str(error) for position, error in errors.items()}
    for position, row in enumerate(upsert):  # a row's columns, before its values
        shape = _shape_problem(row, needed, schema, key)
        if shape is not None:
            wrong[position] = shape
    problems.extend(f"upsert[{position}]: {wrong[position]}" for position in sorted(wrong))
    keys = table.column(key).to_pylist()
    if wrong:
        return table, keys
    first: dict[Any, int] = {}
    for position, value in enumerate(keys):
        if value in first:
            problems.append(f"upsert[{position}]: item id {value!r} is also upsert[{first[value]}]")
        first.setdefault(value, position)
    return table, keys


def _shape_problem(
    row: Mapping[str, Any], needed: list[str], schema: pa.Schema, key: str
) -> str | None:
    """What is wrong with a row's columns: unknown ones, missing ones, a null key."""
    wrong = []
    unknown = [column for column in row if schema.get_field_index(column) < 0]
    if unknown:
        wrong.append(
            f"unknown column(s) {_names(unknown)}; the item table has {_names(schema.names)}"
        )
    missing = [column for column in needed if column not in row]
    if missing:
        wrong.append(
            f"lacks {_names(missing)}, which the item features read (null for a missing value)"
        )
    elif row[key] is None:
        wrong.append(f"the item key {key!r} is null")
    return "; ".join(wrong) or None


def _known(artifact: Artifact, ids: list[Any]) -> list[Any]:
    """Those of ``ids`` the artifact holds."""
    rows = artifact.item_rows(ids) if ids else np.zeros(0, np.int64)
    return [value for value, row in zip(ids, rows, strict=True) if row >= 0]


def _check_ids(
    artifact: Artifact, name: str, ids: list[Any], new: set[Any], problems: list[str]
) -> None:
    """Names the ids of list ``name`` that the artifact does not hold (nor ``new`` adds)."""
    known = set(_known(artifact, ids)) | new
    unknown = [value for value in ids if value not in known]
    if unknown:
        problems.append(f"{name}: unknown item id(s) {_names(unknown)}")


def _check_overlaps(lists: dict[str, list[Any]], problems: list[str]) -> None:
    """Names each id that is in two lists that exclude each other."""
    for first, second in EXCLUSIVE:
        both = set(map(repr, lists[first])) & set(map(repr, lists[second]))
        if both:
            problems.append(f"item id(s) both in {first} and {second}: {', '.join(sorted(both))}")


def _names(values: Sequence[Any]) -> str:
    shown = ", ".join(repr(value) for value in list(values)[:MAX_NAMED])
    return shown + (f" and {len(values) - MAX_NAMED} more" if len(values) > MAX_NAMED else "")
