"""What a change to an artifact's items asks for, checked and embedded: ``ItemChange``
-> ``prepare_update`` -> the ``ItemUpdate`` of the artifact's next version
(``twotower.serving.updates`` writes and applies it).

Rows are checked (the item key and every column the item features read; values
converted to the item table's types where nothing is lost, as a request's rows are:
``twotower.features.rows``), then compared with their item's current row: only a new
row, or one that differs, is embedded by the artifact's own item tower and written.

A new item has no trained embedding: its id feature reads the out-of-vocabulary row of
its table (the one row every id the training data did not hold shares), or for hashed
ids the buckets its id hashes to, shared with trained ids; its other features (a
category, a title, a price) are what place it near the items it resembles. A replaced
item keeps its id, and so its trained id row: only what its other columns say changes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twotower.errors import DataError
from twotower.features.rows import rows_table
from twotower.serving.artifact import Artifact
from twotower.serving.catalogue import Catalogue, ItemUpdate
from twotower.serving.keys import KeyIndex
from twotower.towers.model import embed_rows

MAX_NAMED = 10  # ids an error names at most


def _row_position(row: int) -> str:
    return f"row {row}"


@dataclasses.dataclass(frozen=True)
class ItemChange:
    """A change to an artifact's items, as asked for.

    Attributes:
        rows: raw item rows to add (a new id) or replace (a known id's row, a removed
            id's brought back): a table, or ``{column: value}`` mappings (a JSON
            body's). Each holds the item key and every column the item features read;
            the item table's other columns may be left out (null); no column the item
            table lacks. Values convert to the item table's types where nothing is
            lost (``twotower.features.rows``).
        block: ids to block: kept (still known: an item query for one works) but
            never returned, until unblocked.
        unblock: ids to unblock.
        remove: ids to remove: never returned, and unknown from then on.
        source: what errors call the rows (a file's path).
        position: where row i is, for errors (a file's line).
    """

    rows: pa.Table | Sequence[Mapping[str, Any]] | None = None
    block: Sequence[Any] = ()
    unblock: Sequence[Any] = ()
    remove: Sequence[Any] = ()
    source: str = "the item rows"
    position: Callable[[int], str] = _row_position


def prepare_update(artifact: Artifact, change: ItemChange) -> ItemUpdate:
    """The next version's ``ItemUpdate`` of ``change`` over ``artifact``: its rows that
    are new or differ from their item's current row, embedded; the ids whose state it
    changes (blocking a blocked item, unblocking one that is not, removing a removed
    one changes nothing). An ``ItemUpdate.empty`` one changes nothing at all.

    Rows act first, then blocks, unblocks and removals: a row may add an item that the
    same change blocks.

    Raises:
        DataError: a row without the key or a column the item features read, a value
            that does not convert, an id given twice among the rows, an id to block or
            unblock the artifact does not know (with the rows), one to remove it never
            held, or an id asked for twice at odds (each named).
    """
    catalogue = artifact.catalogue
    rows = item_rows(artifact, change)
    ids = rows.column(artifact.item_key).to_pylist()
    found = catalogue.find(ids)  # (R,) removed ones included; -1: a new id
    held = (found >= 0) & ~catalogue.removed[np.maximum(found, 0)]
    same = np.zeros(len(ids), dtype=bool)
    same[held] = _same_rows(rows.filter(pa.array(held)), catalogue.items.take(found[held]))
    kept = rows.filter(pa.array(~same))
    vectors = embed_rows(artifact.item_tower, artifact.pipeline, "item", kept).cpu().numpy()
    blocked, unblocked, removed = _id_changes(catalogue, rows, artifact.item_key, change)
    return ItemUpdate(
        rows=kept,
        vectors=np.ascontiguousarray(vectors, dtype=np.float32),
        blocked=blocked,
        unblocked=unblocked,
        removed=removed,
        added=int((~held).sum()),
        replaced=int((held & ~same).sum()),
        version=artifact.version + 1,
        follows=artifact.fingerprint,
        unchanged=int(same.sum()),
    )


def item_rows(artifact: Artifact, change: ItemChange) -> pa.Table:
    """``change.rows`` as a table of exactly the item table's schema, each checked.

    Raises:
        DataError: as ``prepare_update`` says of rows (naming source, row and column).
    """
    schema, key = artifact.items.schema, artifact.item_key
    if change.rows is None:
        return schema.empty_table()
    table = change.rows if isinstance(change.rows, pa.Table) else None
    records = table.to_pylist() if table is not None else [dict(r) for r in change.rows]
    required = list(dict.fromkeys([key, *artifact.pipeline.input_columns("item")]))
    given = (
        table.column_names
        if table is not None
        else list(dict.fromkeys(c for r in records for c in r))
    )
    unknown = [c for c in given if c not in schema.names]
    if unknown:
        raise DataError(
            f"{change.source}: column(s) {', '.join(map(repr, unknown))} are not the item "
            f"table's ({', '.join(map(repr, schema.names))})"
        )
    for index, record in enumerate(records):
        lacking = [c for c in required if c not in record]
        if lacking:
            raise DataError(
                f"{change.source}, {change.position(index)}: lacks column(s) "
                f"{', '.join(map(repr, lacking))}; every row holds the item key and each "
                f"column the item features read ({', '.join(map(repr, required))})"
            )
    check = functools.partial(artifact.pipeline.row_errors, "item")
    converted, errors = rows_table(records, schema.names, schema, check)
    if errors:
        index = min(errors)
        raise DataError(f"{change.source}, {change.position(index)}: {errors[index]}")
    out = pa.Table.from_arrays([converted.column(name) for name in schema.names], schema=schema)
    _check_keys(out, key, change)
    return out


def _check_keys(rows: pa.Table, key: str, change: ItemChange) -> None:
    """Refuses a row without an id, and an id given in two rows."""
    ids = rows.column(key)
    if ids.null_count:
        index = int(np.flatnonzero(pc.is_null(ids).to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{change.source}, {change.position(index)}: no item id (column {key!r})")
    first: dict[Any, int] = {}
    for index, value in enumerate(ids.to_pylist()):
        if value in first:
            raise DataError(
                f"{change.source}: item {value!r} is given twice ({change.position(first[value])} "
                f"and {change.position(index)})"
            )
        first[value] = index


def _same_rows(new: pa.Table, old: pa.Table) -> np.ndarray:
    """(R,) bool whether each row of ``new`` holds the same values as that of ``old``
    (null equal to null, NaN to NaN: an unchanged missing value is no change); column
    by column, compared in Arrow (a nested column value by value)."""
    same = np.ones(new.num_rows, dtype=bool)
    for name in new.column_names:
        a, b = new.column(name).combine_chunks(), old.column(name).combine_chunks()
        same &= _same_values(a, b)
    return same


def _same_values(a: pa.Array, b: pa.Array) -> np.ndarray:
    """(R,) bool whether ``a[i]`` equals ``b[i]``, two arrays of one type."""
    kind = a.type
    if pa.types.is_nested(kind) or pa.types.is_dictionary(kind):
        pairs = zip(a.to_pylist(), b.to_pylist(), strict=True)
        return np.array([_same(x, y) for x, y in pairs], dtype=bool)
    equal = pc.fill_null(pc.equal(a, b), False)
    equal = pc.or_(equal, pc.and_(pc.is_null(a), pc.is_null(b)))
    if pa.types.is_floating(kind):
        nan = pc.and_(pc.is_nan(a), pc.is_nan(b))
        equal = pc.or_(equal, pc.fill_null(nan, False))
    return equal.to_numpy(zero_copy_only=False)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # both NaN
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _id_changes(
    catalogue: Catalogue, rows: pa.Table, key: str, change: ItemChange
) -> tuple[tuple[Any, ...], tuple[Any, ...], tuple[Any, ...]]:
    """The ids that ``change`` blocks, unblocks and removes, each as the item table
    spells it, once; those whose state it does not change left out."""
    ours = KeyIndex(rows.column(key).combine_chunks())  # the change's own rows
    block, unblock, remove = list(change.block), list(change.unblock), list(change.remove)
    _refuse_conflicts(catalogue, ours, {"block": block, "unblock": unblock, "remove": remove})
    (can_block, blocked), (can_unblock, was_blocked) = (
        _after_rows(catalogue, ours, ids) for ids in (block, unblock)
    )
    for ids, known, verb in ((block, can_block, "block"), (unblock, can_unblock, "unblock")):
        if not known.all():
            raise DataError(
                f"cannot {verb} item(s) the artifact does not know: {_named(ids, ~known)}"
            )
    held = catalogue.find(remove)
    if (held < 0).any():
        raise DataError(
            f"cannot remove item(s) the artifact never held: {_named(remove, held < 0)}"
        )
    changes = (  # blocking an unblocked item, unblocking a blocked one, removing one not yet
        (block, ~blocked),
        (unblock, was_blocked),
        (remove, ~catalogue.removed[held]),
    )
    out = []
    for ids, keep in changes:
        spelled = _spelled(catalogue, rows, key, ours, ids)
        out.append(
            tuple(dict.fromkeys(v for v, k in zip(spelled, keep.tolist(), strict=True) if k))
        )
    return out[0], out[1], out[2]


def _refuse_conflicts(catalogue: Catalogue, ours: KeyIndex, given: dict[str, list[Any]]) -> None:
    """Refuses an item asked two things at odds: blocked and unblocked, or blocked,
    unblocked or given as a row and removed (equal ids however typed)."""
    places = {verb: _places(catalogue, ours, ids) for verb, ids in given.items()}
    for a, b in (("block", "unblock"), ("block", "remove"), ("unblock", "remove")):
        both = (places[a] >= 0) & np.isin(places[a], places[b])
        if both.any():
            raise DataError(f"items asked both to {a} and to {b}: {_named(given[a], both)}")
    as_rows = ours.rows(catalogue.as_keys(given["remove"])) >= 0
    if as_rows.any():
        raise DataError(f"items given as rows and to remove: {_named(given['remove'], as_rows)}")


def _places(catalogue: Catalogue, ours: KeyIndex, ids: list[Any]) -> np.ndarray:
    """(B,) a number per id equal for equal items however typed (its row, or past the
    rows its position among the change's rows); -1 for an id neither holds."""
    rows, later = catalogue.find(ids), ours.rows(catalogue.as_keys(ids))
    return np.where(rows >= 0, rows, np.where(later >= 0, catalogue.num_items + later, -1))


def _after_rows(
    catalogue: Catalogue, ours: KeyIndex, ids: list[Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Per id, whether the catalogue knows it once the change's rows are in, and whether
    it is blocked then (a row given for a removed or new item is not)."""
    rows = catalogue.find(ids)
    present = rows >= 0
    removed = present & catalogue.removed[np.maximum(rows, 0)]
    known = (present & ~removed) | (ours.rows(catalogue.as_keys(ids)) >= 0)
    blocked = present & ~removed & catalogue.blocked[np.maximum(rows, 0)]
    return known, blocked


def _spelled(
    catalogue: Catalogue, rows: pa.Table, key: str, ours: KeyIndex, ids: list[Any]
) -> list[Any]:
    """Each id as the item table spells it (the change's rows for a new one)."""
    held, later = catalogue.find(ids), ours.rows(catalogue.as_keys(ids))
    values = catalogue.item_id_values[np.maximum(held, 0)].tolist() if len(ids) else []
    new = rows.column(key).to_pylist()
    return [
        v if h >= 0 else (new[n] if n >= 0 else i)
        for v, h, n, i in zip(values, held.tolist(), later.tolist(), ids, strict=True)
    ]


def _named(ids: list[Any], mask: np.ndarray) -> str:
    picked = [i for i, m in zip(ids, mask.tolist(), strict=True) if m]
    more = f" and {len(picked) - MAX_NAMED} more" if len(picked) > MAX_NAMED else ""
    return ", ".join(map(repr, picked[:MAX_NAMED])) + more
