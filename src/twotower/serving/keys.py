"""Key -> row lookups for an artifact's query and item tables, built once per load.

A request names users and items by their keys; serving turns them into table rows
many times a second. Hashing the whole key column for every request would cost
time proportional to the corpus, so each side builds its lookup once:

- integer keys: ``SortedKeys``, the same binary search the feature vocabularies use
  (8 bytes a key plus the row order, no Python object per key);
- any other keys (text): a dict from the key's text to its row.

Ids need not be typed exactly: ``"12"`` finds the integer key 12, and an integer
finds the text key ``"12"``. None, a bool, or anything that matches no key is -1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from twotower.features.categorical import SortedKeys

MISSING = -1


class KeyIndex:
    """Rows of a table's unique key column, looked up by value.

    Args:
        keys: the key column (unique, no nulls, as ``Dataset`` guarantees).
    """

    def __init__(self, keys: pa.Array) -> None:
        self.integer = pa.types.is_integer(keys.type)
        if self.integer:
            self._sorted = SortedKeys(keys.to_numpy(zero_copy_only=False).astype(np.int64))
        else:
            self._rows = {str(key): row for row, key in enumerate(keys.to_pylist())}

    def rows(self, ids: Sequence[Any]) -> np.ndarray:
        """(B,) int64 rows of these ids; -1 where an id matches no key."""
        if not self.integer:
            return np.fromiter(
                (MISSING if _not_an_id(i) else self._rows.get(str(i), MISSING) for i in ids),
                dtype=np.int64,
                count=len(ids),
            )
        numbers = _integers(ids)
        if numbers is not None:  # every id an int or an integer's text: parsed in C
            return self._sorted.find(numbers)
        values = np.fromiter((_as_int(i) for i in ids), dtype=object, count=len(ids))
        valid = np.not_equal(values, None)
        out = np.full(len(ids), MISSING, dtype=np.int64)
        out[valid] = self._sorted.find(values[valid].astype(np.int64))
        return out

    def canonical(self, ids: Sequence[Any]) -> list[Any]:
        """Each id as this key column spells it, known or not: an int for integer keys
        (``"017"`` is 17), text for text keys; an id that is neither stays as given. A
        store that names users by text (the Redis one) then finds one user however a
        request typed its id."""
        if self.integer:
            return [i if (n := _as_int(i)) is None else n for i in ids]
        return [i if _not_an_id(i) else str(i) for i in ids]


def _integers(ids: Sequence[Any]) -> np.ndarray | None:
    """(B,) int64 of ids that are all ints, or all texts of ints in int64's range (as a
    store's replies are); None when any is not, for ``_as_int`` to judge one by one."""
    if not len(ids):
        return np.zeros(0, np.int64)
    try:
        array = np.asarray(ids)
    except ValueError:  # lists among the ids
        return None
    if array.ndim != 1:
        return None
    if array.dtype.kind == "i":
        return array.astype(np.int64)
    if array.dtype.kind != "U":
        return None
    try:  # ASCII first: numpy would read other scripts' digits, which _as_int refuses
        return array.astype("S").astype(np.int64)  # refuses a text not a whole int64
    except (UnicodeEncodeError, ValueError, OverflowError):
        return None


def _not_an_id(value: Any) -> bool:
    return value is None or isinstance(value, (bool, list, dict, tuple, float))


def _as_int(value: Any) -> int | None:
    """An integer key's value from an int or its decimal text; None if it is neither."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value) if -(2**63) <= value < 2**63 else None
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("+-").isdigit() and text.isascii():
            number = int(text)
            return number if -(2**63) <= number < 2**63 else None
    return None
