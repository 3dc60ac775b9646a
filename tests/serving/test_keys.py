"""Key -> row lookups against a plain dict oracle."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from twotower.serving.keys import KeyIndex


def test_integer_keys_are_found_by_value_or_decimal_text():
    index = KeyIndex(pa.array([40, -3, 7, 2**62], pa.int64()))
    ids = [7, "40", " -3 ", 2**62, np.int32(7), 8, "7.0", "x", None, True, 2**70, 1.0, [7]]
    assert index.rows(ids).tolist() == [2, 0, 1, 3, 2, -1, -1, -1, -1, -1, -1, -1, -1]


def test_text_keys_are_found_by_text_and_numbers_by_their_text():
    index = KeyIndex(pa.array(["a", "12", "β", ""], pa.string()))
    assert index.rows(["β", 12, "12", "", "A", None, False, 12.0]).tolist() == [
        2,
        1,
        1,
        3,
        -1,
        -1,
        -1,
        -1,
    ]


def test_an_empty_table_finds_nothing():
    assert KeyIndex(pa.array([], pa.int64())).rows([1, "2"]).tolist() == [-1, -1]
    assert KeyIndex(pa.array([], pa.string())).rows(["a"]).tolist() == [-1]


@given(
    keys=st.lists(st.integers(-(2**63), 2**63 - 1), unique=True, max_size=50),
    probes=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=30),
)
def test_integer_lookup_equals_a_dict(keys, probes):
    rows = {key: row for row, key in enumerate(keys)}
    wanted = probes + keys[:5]
    found = KeyIndex(pa.array(keys, pa.int64())).rows(wanted)
    assert found.tolist() == [rows.get(p, -1) for p in wanted]


def test_canonical_spells_ids_as_the_key_column_does_known_or_not():
    integer = KeyIndex(pa.array([5, 17], pa.int64()))
    assert integer.canonical([17, "17", " 017", "ghost", 2.5, 99]) == [17, 17, 17, "ghost", 2.5, 99]
    text = KeyIndex(pa.array(["a", "17"]))
    assert text.canonical([17, "17", "b", None]) == ["17", "17", "b", None]


def test_texts_of_integers_find_integer_keys_as_ints_do_in_bulk():
    """A store's replies (every id the text of an int) take the parsed path; any id
    that is not one sends the batch one id at a time, with the same answers."""
    keys = KeyIndex(pa.array([5, 17, -3], pa.int64()))
    texts = ["17", " 17", "+017", "-3", "4"]
    assert keys.rows(texts).tolist() == [1, 1, 1, 2, -1]
    assert keys.rows([*texts, "x"]).tolist() == [1, 1, 1, 2, -1, -1]
    assert keys.rows(["\u0661\u0667", "17"]).tolist() == [-1, 1]  # other scripts' digits
    assert keys.rows(["99999999999999999999", "5"]).tolist() == [-1, 0]
    assert keys.rows([17, 5]).tolist() == [1, 0] and keys.rows([]).tolist() == []
