"""Filters on item columns: masks against a row-by-row oracle, every check's error, the
cache, and the search that applies them (the exact fallback for narrow filters)."""

from __future__ import annotations

import math
import random

import numpy as np
import pyarrow as pa
import pytest

from twotower.errors import DataError
from twotower.index import ExactIndex, HNSWIndex, IVFPQIndex
from twotower.serving.catalogue import Catalogue
from twotower.serving.filters import FilterMasks


@pytest.fixture(scope="module")
def items() -> pa.Table:
    """Every kind of column, with nulls (and a NaN) where a column may hold them."""
    return pa.table(
        {
            "item_id": pa.array([10, 11, 12, 13, 14, 15], pa.int64()),
            "category": ["toys", "games", None, "toys", "books", "games"],
            "price": [5.0, 19.99, 20.0, None, float("nan"), 35.5],
            "stock": pa.array([0, 3, None, 7, 2, 9], pa.int32()),
            "sale": [True, False, None, False, True, False],
            "tags": pa.array([["a", "b"], [], None, ["c"], ["b", None], ["a"]]),
            "shelf": pa.array(["x", "y", "x", "y", "x", None]).dictionary_encode(),
            "added": pa.array([1, 2, 3, 4, 5, 6], pa.timestamp("s")),
        }
    )


def holds(value, operator: str, argument) -> bool:
    """One condition on one value, as docs/serving.md states it (the oracle)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if isinstance(value, list):
        found = any(element in argument for element in value if element is not None)
        return found if operator == "in" else not found
    if operator in ("in", "not_in"):
        return (value in argument) == (operator == "in")
    return {"gt": value > argument, "gte": value >= argument}.get(
        operator, value < argument if operator == "lt" else value <= argument
    )


def oracle_mask(table: pa.Table, filter: dict) -> np.ndarray:
    rows = table.to_pylist()
    return np.array(
        [
            all(holds(row[c], op, arg) for c, cond in filter.items() for op, arg in cond.items())
            for row in rows
        ],
        dtype=bool,
    )


@pytest.mark.parametrize(
    "filter",
    [
        {"category": {"in": ["toys", "games"]}},
        {"category": {"not_in": ["toys"]}},
        {"price": {"lt": 20}},
        {"price": {"gte": 5, "lt": 20}},
        {"price": {"gt": 19.99}, "category": {"in": ["games"]}},
        {"price": {"not_in": [5, 35.5]}},
        {"stock": {"gt": 2.5}},
        {"stock": {"lte": 3, "gte": 0}},
        {"stock": {"in": [3, 7.0, 2.5]}},
        {"stock": {"lt": 10**30}},
        {"stock": {"gt": -(10**30)}},
        {"sale": {"in": [True]}},
        {"sale": {"not_in": [True]}},
        {"tags": {"in": ["b"]}},
        {"tags": {"not_in": ["a"]}},
        {"shelf": {"in": ["x"]}},
        {"item_id": {"in": [11, 14, 99]}},
        {"category": {"in": []}},
    ],
)
def test_a_mask_keeps_exactly_the_rows_the_filter_states(items, filter):
    assert FilterMasks(items).select(filter).mask.tolist() == oracle_mask(items, filter).tolist()


@pytest.mark.parametrize(
    "filter",
    [
        {"small": {"lt": 1000}},
        {"small": {"gt": -1000, "in": [1, 300]}},
        {"small": {"lte": 2**70}},
        {"unsigned": {"gt": -1}},
        {"unsigned": {"in": [3, -1]}},
        {"unsigned": {"lt": 2**70}},
        {"single": {"gt": 2}, "wide": {"lt": 10**400}},
        {"wide": {"gt": -(10**400)}},
        {"shorts": {"in": [2, 1e30]}},
        {"words": {"not_in": ["x"]}},
    ],
)
def test_every_integer_and_float_width_and_any_json_number_compare_as_numbers(filter):
    table = pa.table(
        {
            "small": pa.array([1, 2, None], pa.int8()),
            "unsigned": pa.array([1, 2**64 - 1, 3], pa.uint64()),
            "single": pa.array([1.5, 2.5, None], pa.float32()),
            "wide": [1.0, -2.0, 3.0],
            "shorts": pa.array([[1, 2], [3], None], pa.list_(pa.int16())),
            "words": pa.array([["x"], ["y"], []], pa.large_list(pa.large_string())),
        }
    )
    assert FilterMasks(table).select(filter).mask.tolist() == oracle_mask(table, filter).tolist()


def test_random_filters_agree_with_the_row_by_row_oracle():
    rng = random.Random(0)
    n = 500
    table = pa.table(
        {
            "c": [rng.choice(["a", "b", "c", "d", None]) for _ in range(n)],
            "x": [rng.choice([None, rng.uniform(-5, 5)]) for _ in range(n)],
            "i": [rng.choice([None, rng.randrange(-3, 4)]) for _ in range(n)],
        }
    )
    masks = FilterMasks(table)
    for _ in range(100):
        filter = {}
        if rng.random() < 0.6:
            filter["c"] = {rng.choice(["in", "not_in"]): rng.sample(["a", "b", "c", "d"], 2)}
        if rng.random() < 0.6 or not filter:
            filter["x"] = {op: rng.uniform(-5, 5) for op in rng.sample(["gt", "gte", "lt"], 2)}
        if rng.random() < 0.4:
            filter["i"] = dict([rng.choice([("in", [0, 2]), ("lte", 1), ("not_in", [-1])])])
        assert masks.select(filter).mask.tolist() == oracle_mask(table, filter).tolist(), filter


@pytest.mark.parametrize(
    "filter, message",
    [
        ({}, "filter is empty"),
        ([("category", {"in": ["toys"]})], "filter must map column names to conditions"),
        (
            {"colour": {"in": ["red"]}},
            "'colour': no such column; the filterable columns are 'item_id', 'category', "
            "'price', 'stock', 'sale', 'tags', 'shelf'",
        ),
        ({"added": {"gt": 1}}, "'added': its type timestamp[s] is not filterable"),
        ({"category": {"lt": 20}}, "'category' holds text, and a range (lt) compares"),
        ({"tags": {"gt": 1}}, "'tags' holds lists of text, and a range (gt)"),
        ({"sale": {"gte": 1}}, "'sale' holds booleans, and a range (gte)"),
        ({"price": {"in": ["cheap"]}}, "'price' holds numbers, so in takes numbers; got 'cheap'"),
        ({"stock": {"in": [True]}}, "'stock' holds integers, so in takes numbers; got True"),
        ({"category": {"not_in": [3]}}, "'category' holds text, so not_in takes text; got 3"),
        ({"sale": {"in": ["yes"]}}, "'sale' holds booleans, so in takes booleans"),
        ({"category": {"in": "toys"}}, "in takes a list of values, got 'toys'"),
        ({"category": {"in": "t" * 5000}}, "in takes a list of values, got 'ttttt"),
        ({"price": {"lt": "20"}}, "lt takes a finite number, got '20'"),
        ({"price": {"lt": float("nan")}}, "lt takes a finite number, got nan"),
        ({"price": {"lt": True}}, "lt takes a finite number, got True"),
        ({"price": {}}, "filter on 'price': a condition maps one or more of in, not_in"),
        ({"price": 20}, "filter on 'price': a condition maps"),
        ({"price": {"below": 20}}, "unknown operator 'below'; use in, not_in, gt, gte, lt, lte"),
    ],
)
def test_each_bad_filter_is_refused_naming_the_column_and_the_fault(items, filter, message):
    with pytest.raises(DataError) as caught:
        FilterMasks(items).select(filter)
    assert message in str(caught.value)
    assert len(str(caught.value)) < 300  # a value is named, not echoed whole


def test_a_filter_asked_again_is_a_lookup_and_the_cache_is_bounded(items):
    masks = FilterMasks(items, cache_bytes=2 * items.num_rows)  # two masks
    first = masks.select({"category": {"in": ["toys", "games"]}, "price": {"lt": 20}})
    again = masks.select({"price": {"lt": 20.0}, "category": {"in": ["games", "toys", "toys"]}})
    assert again.mask is first.mask and again.key == first.key
    assert (masks.hits, masks.misses) == (1, 1)
    assert not first.mask.flags.writeable  # shared: nobody may change it
    masks.select({"stock": {"gt": 1}})
    masks.select({"stock": {"gt": 2}})  # the first filter, least recently used, goes
    assert masks.select({"price": {"lt": 20}, "category": {"in": ["toys", "games"]}}).mask is not (
        first.mask
    )
    assert (masks.hits, masks.misses) == (1, 4)


def clustered(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim))
    x = centres[rng.integers(20, size=n)] + 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def catalogue_of(index, vectors: np.ndarray) -> Catalogue:
    """The served catalogue of an export with these vectors and index."""
    items = pa.table({"item_id": np.arange(len(vectors), dtype=np.int64)})
    return Catalogue.exported(items, vectors, index, "item_id")


@pytest.mark.parametrize("kind", [HNSWIndex, IVFPQIndex])
def test_a_narrow_filter_on_an_approximate_index_is_searched_exactly(kind):
    vectors, queries = clustered(4000), clustered(32, seed=1)
    index = kind()
    index.build(vectors)
    allowed = np.zeros(len(vectors), dtype=bool)
    allowed[np.random.default_rng(2).choice(len(vectors), 40, replace=False)] = True
    exact = ExactIndex()
    exact.build(vectors)
    truth = exact.search(queries, 10, allowed=allowed)
    catalogue = catalogue_of(index, vectors)
    assert catalogue.searched_exactly(allowed, 40)
    ids, scores, interests = catalogue.search(queries, 10, allowed=allowed, exact_limit=40)
    np.testing.assert_array_equal(ids, truth[0])
    np.testing.assert_allclose(scores, truth[1], rtol=1e-6)
    assert interests is None
    assert np.shares_memory(catalogue.exact._vectors.numpy(), vectors)  # no copy
    assert not catalogue.searched_exactly(allowed, 39)
    assert not catalogue.searched_exactly(None, 39)
    ids, _, _ = catalogue.search(queries, 10, allowed=allowed, exact_limit=39)
    assert allowed[ids[ids >= 0]].all()  # the index's own search: never a left-out item


def test_an_exact_index_searches_itself_whatever_the_filter():
    vectors = clustered(300)
    index = ExactIndex()
    index.build(vectors)
    assert not catalogue_of(index, vectors).searched_exactly(np.ones(300, dtype=bool), 10**9)


def test_multi_interest_queries_are_searched_with_the_mask_too():
    vectors = clustered(2000)
    queries = clustered(24, seed=3).reshape(8, 3, 16)
    index = HNSWIndex()
    index.build(vectors)
    allowed = np.arange(2000) % 50 == 0
    exact = ExactIndex()
    exact.build(vectors)
    ids, scores, interests = catalogue_of(index, vectors).search(queries, 5, None, allowed, 100)
    expected = exact.search_interests(queries, 5, allowed=allowed)
    for got, want in zip((ids, scores, interests), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
