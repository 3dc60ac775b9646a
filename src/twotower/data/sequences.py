"""An adapter for sequence files: one line per user, the user's items in time order.

The format of the S3-Rec preprocessing of the Amazon review categories (and of many
next-item benchmarks after it)::

    1 1 2 3 4 5
    2 6 7 8 9 10 7

Each line is a user id, then the ids of the items that user interacted with, oldest
first, separated by spaces. There are no timestamps: a user's order is the only time
there is, so each interaction's ``timestamp`` is its position in its line (0 for the
oldest), which is what splits (``leave_last_out``) and histories order by. Time-gap
features read these positions as seconds, so they carry no information here; and a
split by global time (``split.method: time``) is meaningless.

Beside the file, ``<stem>_item2attributes.json`` (``Toys_and_Games.txt`` and
``Toys_and_Games_item2attributes.json``), when present, is one JSON object mapping
each item id (a string) to a list of attribute ids (brand and category, in the Amazon
files). It becomes the item column ``attributes``, a list of int64 with repeats
removed (an item can list a category twice, under two category paths), for a
``multihot`` item feature. An item of the sequences without an entry has no
attributes; an entry for an item no user has is still a catalogue item.

The Amazon folders ship as ``amazon-toys/Toys_and_Games.txt`` and
``amazon-sports/Sports_and_Outdoors.txt``; ``data.source: amazon-toys`` and
``amazon-sports`` read those folders, ``data.source: sequences`` any such file
(``data.path``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv

from twotower.data.dataset import ITEM_ID, QUERY_ID, TIMESTAMP, Dataset
from twotower.data.tables import first_failure
from twotower.errors import DataError

USER_KEY = "user_id"
ITEM_KEY = "item_id"
ATTRIBUTES = "attributes"
ATTRIBUTES_SUFFIX = "_item2attributes.json"
# The sequence file of each Amazon folder, named as the S3-Rec preprocessing ships it.
AMAZON_FILES = {
    "amazon-toys": "Toys_and_Games.txt",
    "amazon-sports": "Sports_and_Outdoors.txt",
}


def load_sequences(path: str | Path, name: str | None = None) -> Dataset:
    """Loads a sequence file and, beside it, its item attributes if present.

    Args:
        path: the sequence file (``user item item ...`` per line, oldest item first).
        name: the dataset's label (default: the file's stem).

    Returns:
        Interactions with ``timestamp`` = the item's position in its user's line; users
        keyed by ``user_id`` (no features); items keyed by ``item_id``, with
        ``attributes`` when the attributes file exists.

    Raises:
        DataError: naming the file and line: a missing or unreadable file, a blank
            line, a line with no item, a token that is not an integer id, a user on
            two lines; for the attributes file, what is wrong with it.
    """
    path = Path(path)
    users, items, positions = _read_lines(path)
    interactions = pa.table({QUERY_ID: users, ITEM_ID: items, TIMESTAMP: positions})
    attributes = path.with_name(path.stem + ATTRIBUTES_SUFFIX)
    catalogue = np.unique(items)
    if attributes.is_file():
        item_table = _item_attributes(attributes, catalogue)
    else:
        item_table = pa.table({ITEM_KEY: pa.array(catalogue)})
    return Dataset.from_tables(
        interactions,
        pa.table({USER_KEY: pa.array(np.unique(users))}),
        item_table,
        query_key=USER_KEY,
        item_key=ITEM_KEY,
        name=name or path.stem,
    )


def amazon_adapter(source: str) -> Callable[[Path], Dataset]:
    """The adapter of an Amazon folder (``amazon-toys``, ``amazon-sports``)."""

    def load(folder: Path) -> Dataset:
        return load_sequences(Path(folder) / AMAZON_FILES[source], name=source)

    return load


def _read_lines(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each interaction's user, item and position in its line (int64), line by line."""
    if not path.is_file():
        raise DataError(f"{path}: no such sequence file")
    try:
        lines = pv.read_csv(
            path,
            read_options=pv.ReadOptions(column_names=["line"]),
            # No delimiter or quote can occur in a line of ids: each line is one value.
            parse_options=pv.ParseOptions(
                delimiter="\x1f", quote_char=False, ignore_empty_lines=False
            ),
            convert_options=pv.ConvertOptions(column_types={"line": pa.string()}),
        ).column("line")
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"{path}: unreadable as a sequence file: {error}") from None
    lines = pc.utf8_trim_whitespace(lines.combine_chunks())
    tokens = pc.split_pattern_regex(lines, r"\s+")
    lengths = pc.list_value_length(tokens).to_numpy(zero_copy_only=False)
    blank = np.flatnonzero(pc.equal(lines, "").to_numpy(zero_copy_only=False) | (lengths < 2))
    if len(blank):
        raise DataError(
            f"{path}, line {blank[0] + 1}: a line is a user id, then at least one item id"
        )
    ids = _integers(pc.list_flatten(tokens), lengths, path)
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    users = ids[starts]
    _check_distinct_users(users, path)
    is_item = np.ones(len(ids), dtype=bool)
    is_item[starts] = False
    counts = lengths - 1
    positions = np.arange(counts.sum()) - np.repeat(np.r_[0, np.cumsum(counts)[:-1]], counts)
    return np.repeat(users, counts), ids[is_item], positions


def _integers(tokens: pa.Array, lengths: np.ndarray, path: Path) -> np.ndarray:
    """The tokens as int64, or the line and text of the first that is not an id."""
    try:
        return pc.cast(tokens, pa.int64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        bad = first_failure(tokens, lambda part: pc.cast(part, pa.int64()))
        bad = 0 if bad is None else bad
        line = int(np.searchsorted(np.cumsum(lengths), bad, side="right")) + 1
        raise DataError(
            f"{path}, line {line}: {tokens[bad].as_py()!r} is not an integer id"
        ) from None


def _check_distinct_users(users: np.ndarray, path: Path) -> None:
    order = np.argsort(users, kind="stable")
    repeated = np.flatnonzero(users[order][1:] == users[order][:-1])
    if len(repeated):
        first, second = sorted(order[repeated[0] : repeated[0] + 2] + 1)
        raise DataError(
            f"{path}, lines {first} and {second}: user {users[order][repeated[0]]} has two "
            "lines; a user's items are one line, oldest first"
        )


def _item_attributes(path: Path, catalogue: np.ndarray) -> pa.Table:
    """The attributes file as ``item_id`` and ``attributes`` (list of int64, repeats
    removed), over the catalogue's items and every item the file names."""
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a JSON file: {error}") from None
    if not isinstance(mapping, dict):
        raise DataError(f"{path}: expected one object mapping item ids to attribute lists")
    keys = pa.array(list(mapping), pa.string())
    try:
        lists = pa.array(list(mapping.values()), pa.list_(pa.int64()))
        items = pc.cast(keys, pa.int64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        raise DataError(
            f"{path}: {_first_bad_entry(mapping)}; expected "
            '{"item id": [attribute id, ...]} with integer ids'
        ) from None
    values = pc.list_flatten(lists).to_numpy()
    rows = np.repeat(np.arange(len(items)), pc.list_value_length(lists).fill_null(0))
    # Repeats removed, first occurrence kept, order otherwise as the file lists them.
    _, first = np.unique(np.stack([rows, values]), axis=1, return_index=True)
    first.sort()
    all_items = np.union1d(items, catalogue)
    slot = np.searchsorted(all_items, items)
    counts = np.bincount(slot[rows[first]], minlength=len(all_items))
    order = np.argsort(slot[rows[first]], kind="stable")
    attributes = pa.ListArray.from_arrays(
        pa.array(np.r_[0, np.cumsum(counts)].astype(np.int32)), pa.array(values[first][order])
    )
    return pa.table({ITEM_KEY: pa.array(all_items), ATTRIBUTES: attributes})


def _first_bad_entry(mapping: dict) -> str:
    """The first entry that is not an integer id with a list of integer ids, described
    (reached only for a file already found wrong, to name where)."""
    for key, value in mapping.items():
        if not key.strip().lstrip("-").isdigit():
            return f"item id {key!r} is not an integer"
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return f"item {key}'s attributes {value!r} are not a list of integer ids"
    return "an entry is malformed"
