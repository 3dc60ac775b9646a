"""Categorical features: the vocabulary, hashed ids, one-hot and multi-hot lists."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twotower.features.categorical import (
    IdTransform,
    MultiHotTransform,
    OneHotTransform,
    Vocabulary,
)
from twotower.features.hashing import hash_buckets
from twotower.features.specs import IdFeature, MultiHotFeature, OneHotFeature
from twotower.features.transform import MISSING, OOV, FitContext

# Counts: b 3, a 2, c 2, d 1 (the null is not a value).
VALUES = pa.array(["b", "a", "c", "b", "a", "d", "b", "c", None])


def _indices(vocabulary: Vocabulary, values: list) -> list[int]:
    return vocabulary.lookup(pa.array(values)).tolist()


# ---- Vocabulary ------------------------------------------------------------------------------


def test_vocabulary_is_most_frequent_first_with_ties_by_value() -> None:
    vocabulary = Vocabulary.fit(VALUES, None, min_count=1, max_size=None)
    assert vocabulary.values.to_pylist() == ["b", "a", "c", "d"]  # a, c tie at 2: by value
    assert _indices(vocabulary, ["b", "a", "c", "d"]) == [2, 3, 4, 5]


def test_min_count_sends_rare_values_out_of_vocabulary() -> None:
    vocabulary = Vocabulary.fit(VALUES, None, min_count=2, max_size=None)
    assert _indices(vocabulary, ["b", "a", "c", "d"]) == [2, 3, 4, OOV]  # d seen once


def test_max_size_keeps_the_most_frequent() -> None:
    vocabulary = Vocabulary.fit(VALUES, None, min_count=1, max_size=2)
    assert _indices(vocabulary, ["b", "a", "c", "d"]) == [2, 3, OOV, OOV]


def test_weights_count_each_row_that_many_times() -> None:
    # Rows x, y, z, x with weights 1, 5, 5, 2: x 3, y 5, z 5 (y, z tie: by value).
    values = pa.array(["x", "y", "z", "x"])
    weights = np.array([1, 5, 5, 2])
    assert Vocabulary.fit(values, None, 1, None).values.to_pylist() == ["x", "y", "z"]
    assert Vocabulary.fit(values, weights, 1, None).values.to_pylist() == ["y", "z", "x"]
    assert Vocabulary.fit(values, weights, 4, None).values.to_pylist() == ["y", "z"]


def test_weights_skip_null_rows() -> None:
    # The null row's weight must not be given to another value: x 1, y 2.
    values = pa.array(["x", None, "y"])
    vocabulary = Vocabulary.fit(values, np.array([1, 100, 2]), 1, None)
    assert vocabulary.values.to_pylist() == ["y", "x"]


def test_id_feature_passes_weights_from_the_fit_context() -> None:
    transform = IdTransform(IdFeature("user", "user"))
    transform.fit(pa.array([10, 20, 30]), FitContext(weights=np.array([1, 3, 2])))
    assert transform.transform(pa.array([20, 30, 10, 40, None])).tolist() == [2, 3, 4, OOV, MISSING]
    assert transform.size == 3 + 2


def test_lookup_missing_is_0_and_unseen_is_1() -> None:
    vocabulary = Vocabulary.fit(VALUES, None, 1, None)
    assert _indices(vocabulary, [None, "zzz", "a", ""]) == [MISSING, OOV, 3, OOV]


def test_lookup_of_a_chunked_array() -> None:
    vocabulary = Vocabulary.fit(VALUES, None, 1, None)
    chunked = pa.chunked_array([pa.array(["a", None]), pa.array(["q", "b"])])
    assert vocabulary.lookup(chunked).tolist() == [3, MISSING, OOV, 2]


def test_int_vocabulary_matches_strings_and_other_int_widths() -> None:
    # Counts: 12 twice, 7 once.
    vocabulary = Vocabulary.fit(pa.array([12, 7, 12]), None, 1, None)
    assert _indices(vocabulary, ["12", "7", "13", "x", None]) == [2, 3, OOV, OOV, MISSING]
    int32 = pa.array([7, 12, 5, None], pa.int32())
    assert vocabulary.lookup(int32).tolist() == [3, 2, OOV, MISSING]
    assert _indices(vocabulary, [12.0, 12.5]) == [2, OOV]


def test_string_vocabulary_matches_ints() -> None:
    vocabulary = Vocabulary.fit(pa.array(["12", "7", "12"]), None, 1, None)
    assert vocabulary.lookup(pa.array([7, 12, 3])).tolist() == [3, 2, OOV]


def test_empty_vocabulary_maps_everything_to_oov_or_missing() -> None:
    vocabulary = Vocabulary.fit(pa.array([None, None], pa.string()), None, 1, None)
    assert len(vocabulary) == 0
    assert _indices(vocabulary, ["a", None]) == [OOV, MISSING]
    assert _indices(vocabulary, [3, None]) == [OOV, MISSING]


# ---- Hashed ids ------------------------------------------------------------------------------

HASHED = ["a", "item-42", "Café", "", "7", None, "a"]


def test_hashed_ids_are_in_1_to_buckets_and_null_is_0() -> None:
    transform = IdTransform(IdFeature("h", "h", hash_buckets=16))
    transform.fit(pa.array(["ignored"]), FitContext())
    many = pa.array([f"id{i}" for i in range(500)] + [None])
    buckets = transform.transform(many)
    assert buckets.dtype == np.int64
    assert buckets[-1] == MISSING
    assert buckets[:-1].min() >= 1 and buckets[:-1].max() <= 16
    assert len(set(buckets[:-1].tolist())) == 16  # 500 ids fill every bucket
    assert transform.size == 17


def test_two_hash_functions_give_two_independent_buckets_per_value() -> None:
    one = IdTransform(IdFeature("h", "h", hash_buckets=50))
    two = IdTransform(IdFeature("h", "h", hash_buckets=50, hash_functions=2))
    values = pa.array([f"id{i}" for i in range(2000)] + [None])
    first, pair = one.transform(values), two.transform(values)
    assert pair.shape == (2001, 2)
    assert np.array_equal(pair[:, 0], first)  # the first hash is the one-hash bucket
    assert pair[-1].tolist() == [MISSING, MISSING]
    # independent: a pair of values shares one bucket often, both about 1/50 as often
    same_first = pair[:-1, 0][:, None] == pair[:-1, 0][None, :]
    same_second = pair[:-1, 1][:, None] == pair[:-1, 1][None, :]
    both = (same_first & same_second).sum() - 2000
    assert 0 < both < 4 * (same_first.sum() - 2000) / 50
    with pytest.raises(ValueError, match="needs hash_buckets"):
        IdFeature("h", "h", hash_functions=2)


def test_same_value_same_bucket_and_ints_hash_like_their_decimal_strings() -> None:
    strings = hash_buckets(pa.array(HASHED), 1000).tolist()
    assert strings[0] == strings[-1]  # "a" twice
    ints = hash_buckets(pa.array([7, -3, 2**63 - 1, -(2**63), 10**18]), 1000).tolist()
    texts = ["7", "-3", str(2**63 - 1), str(-(2**63)), str(10**18)]
    assert ints == hash_buckets(pa.array(texts), 1000).tolist()
    assert strings[4] == ints[0]  # "7" and 7


@settings(deadline=None)
@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_any_int64_hashes_like_its_decimal_string(value: int) -> None:
    as_int = hash_buckets(pa.array([value], pa.int64()), 1 << 20)
    assert as_int.tolist() == hash_buckets(pa.array([str(value)]), 1 << 20).tolist()


def test_numbers_beyond_int64_hash_as_text() -> None:
    too_big = pa.array([str(2**63), str(-(2**63) - 1), "1" * 25])
    assert hash_buckets(too_big, 1000).min() >= 1


def test_hash_buckets_are_pinned() -> None:
    # Saved models depend on these exact buckets: changing the hash breaks them.
    assert hash_buckets(pa.array(HASHED), 1000).tolist() == [404, 95, 208, 536, 488, 0, 404]


def test_hash_buckets_are_the_same_in_another_process() -> None:
    # Python's own hash() of a str differs per process (PYTHONHASHSEED); ours must not.
    code = (
        "import pyarrow as pa\n"
        "from twotower.features.hashing import hash_buckets\n"
        f"print(hash_buckets(pa.array({HASHED!r}), 1000, seed=1).tolist())\n"
        "print(hash('item-42'))\n"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.splitlines()
        for seed in ("1", "2")
    ]
    assert runs[0][1] != runs[1][1]  # the processes do salt str hashes differently
    expected = str(hash_buckets(pa.array(HASHED), 1000, seed=1).tolist())
    assert runs[0][0] == runs[1][0] == expected


# ---- One-hot ---------------------------------------------------------------------------------


def test_one_hot_exact_matrix() -> None:
    transform = OneHotTransform(OneHotFeature("c", "c"))
    transform.fit(pa.array(["a", "b", "a"]), FitContext())  # a 2, b 1: a -> 2, b -> 3
    matrix = transform.transform(pa.array(["b", None, "z", "a"]))
    expected = np.array(
        [
            [0, 0, 0, 1],  # b
            [1, 0, 0, 0],  # missing
            [0, 1, 0, 0],  # unseen
            [0, 0, 1, 0],  # a
        ],
        np.float32,
    )
    assert matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix, expected)
    assert transform.size == 4


def test_one_hot_min_count() -> None:
    transform = OneHotTransform(OneHotFeature("c", "c", min_count=2))
    transform.fit(pa.array(["a", "b", "a"]), FitContext())
    assert transform.transform(pa.array(["a", "b"])).argmax(axis=1).tolist() == [2, OOV]


# ---- Multi-hot -------------------------------------------------------------------------------


@pytest.fixture
def genres() -> MultiHotTransform:
    # Token counts: b 3, a 1, c 1 -> b 2, a 3, c 4.
    transform = MultiHotTransform(MultiHotFeature("g", "g"))
    transform.fit(pa.array(["a|b", "b|c", "b", None]), FitContext())
    return transform


def test_multi_hot_from_strings_exact_padded_matrix(genres: MultiHotTransform) -> None:
    rows = ["a|b", "", None, "a||c", " c | a ", "a|zz|b"]
    expected = np.array(
        [
            [3, 2, 0],  # a|b
            [0, 0, 0],  # empty string: no token
            [0, 0, 0],  # missing
            [3, 4, 0],  # the empty token between || is dropped
            [4, 3, 0],  # tokens are trimmed
            [3, OOV, 2],  # zz unseen
        ]
    )
    matrix = genres.transform(pa.array(rows))
    assert matrix.dtype == np.int64
    np.testing.assert_array_equal(matrix, expected)
    assert genres.size == 3 + 2


def test_multi_hot_from_an_arrow_list_column(genres: MultiHotTransform) -> None:
    lists = pa.array([["a", "b"], [], None, ["c", None, ""], ["q"]], pa.list_(pa.string()))
    expected = np.array([[3, 2], [0, 0], [0, 0], [4, 0], [OOV, 0]])
    np.testing.assert_array_equal(genres.transform(lists), expected)


def test_multi_hot_fitted_on_a_list_column_reads_strings_alike() -> None:
    transform = MultiHotTransform(MultiHotFeature("g", "g"))
    transform.fit(pa.array([[1, 2], [2]], pa.list_(pa.int64())), FitContext())  # 2 -> 2, 1 -> 3
    from_lists = transform.transform(pa.array([[2, 1], [3]], pa.list_(pa.int64())))
    from_strings = transform.transform(pa.array(["2|1", "3"]))
    np.testing.assert_array_equal(from_lists, [[2, 3], [OOV, 0]])
    np.testing.assert_array_equal(from_strings, from_lists)


def test_multi_hot_keeps_the_first_max_len_tokens() -> None:
    transform = MultiHotTransform(MultiHotFeature("g", "g", max_len=2))
    transform.fit(pa.array(["a|b|c"]), FitContext())  # all once: a 2, b 3, c 4
    np.testing.assert_array_equal(transform.transform(pa.array(["c|b|a", "a"])), [[4, 3], [2, 0]])


def test_multi_hot_custom_separator() -> None:
    transform = MultiHotTransform(MultiHotFeature("g", "g", separator=","))
    transform.fit(pa.array(["x,y", "y"]), FitContext())  # y 2, x 1 -> y 2, x 3
    np.testing.assert_array_equal(transform.transform(pa.array(["x,y", "x|y"])), [[3, 2], [1, 0]])


def test_multi_hot_of_no_rows(genres: MultiHotTransform) -> None:
    assert genres.transform(pa.array([], pa.string())).shape == (0, 1)


@pytest.mark.parametrize(
    "vocabulary",
    [
        pa.array(np.arange(5000, 0, -1) * 7, pa.int64()),
        pa.array([f"v{i}" for i in range(5000)] + ["", "β", "a b"], pa.string()),
        pa.array([f"v{i}" for i in range(3000)] + ["tail\x00"], pa.string()),
        pa.array([9, 4, 30], pa.int64()),  # a small vocabulary: few values still search
        pa.array(["b", "", "a"], pa.string()),
    ],
)
def test_a_few_values_against_a_vocabulary_equal_the_hashed_lookup(vocabulary) -> None:
    from twotower.features.categorical import Vocabulary

    vocab = Vocabulary(vocabulary)
    picked = vocabulary.take(pa.array([0, min(17, len(vocabulary) - 2), len(vocabulary) - 1]))
    if pa.types.is_integer(vocabulary.type):
        few = pa.concat_arrays([picked, pa.array([None, 3, -7], pa.int64())])
    else:
        few = pa.concat_arrays([picked, pa.array([None, "zz", "v1\x00", "tail"], pa.string())])
    searched = vocab.lookup(few)  # few values: the sorted, binary-searched path
    many = pa.concat_arrays([few] * 200)  # many values: the hashed path
    np.testing.assert_array_equal(searched, vocab.lookup(many)[: len(few)])
    assert searched[0] == 2 and searched[3] == 0 and (searched[4:] == 1).all()
    if pa.types.is_integer(vocabulary.type):
        first = str(vocabulary[0].as_py())
        as_text = vocab.lookup(pa.array([first, "x", None]))  # text compared as text
        np.testing.assert_array_equal(as_text, [2, 1, 0])


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    integer=st.booleans(),
    kind=st.sampled_from([pa.int64(), pa.int32(), pa.int8()]),
)
def test_a_lone_requests_values_get_the_codes_of_the_array_path(data, integer, kind) -> None:
    """One request's few values are looked up as Python values (``_lookup_few``); on any
    vocabulary and any values, text or integers, nulls and unseen values among them, the
    codes are those of the hashed array path that many values take."""
    if integer:
        bounds = {pa.int8(): 127, pa.int32(): 2**31 - 1, pa.int64(): 2**63 - 1}[kind]
        value = st.integers(-bounds - 1, bounds)
    else:
        kind, value = pa.string(), st.text(max_size=4)
    vocabulary = pa.array(data.draw(st.lists(value, min_size=1, max_size=40, unique=True)), kind)
    few = pa.array(
        data.draw(
            st.lists(
                st.one_of(st.none(), value, st.sampled_from(vocabulary.to_pylist())), max_size=64
            )
        ),
        kind,
    )
    vocab = Vocabulary(vocabulary)
    many = pa.concat_arrays([few] * (64 * len(vocabulary) // max(len(few), 1) + 2))
    np.testing.assert_array_equal(vocab.lookup(few), vocab.lookup(many)[: len(few)])
    assert vocab.lookup(few).dtype == np.int64
