"""Filtered recall through the retriever and over HTTP: the exact index answers what a
brute-force search over the filtered items answers; every index kind answers only
items that satisfy the filter; a bad filter fails its own query only."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from fastapi.testclient import TestClient

from twotower.errors import DataError
from twotower.index import INDEXES
from twotower.serving import Retriever
from twotower.serving.catalogue import Catalogue
from twotower.serving.http import ServiceConfig, create_app
from twotower.serving.query import Query

LOOPBACK = ("127.0.0.1", 50000)

FILTERS = [
    {"category": {"in": ["c1", "c3"]}},
    {"price": {"lt": 12}},  # price has missing values: those items never match
    {"category": {"not_in": ["c0"]}, "price": {"gte": 8, "lte": 30}, "views": {"gt": 20}},
    {"item_id": {"in": [3, 5, 8, 13, 21, 34, 55, 89]}},
]


def satisfied(retriever: Retriever, filter: dict) -> np.ndarray:
    """(N,) bool: the items whose row satisfies ``filter``, checked row by row."""
    tests = {
        "in": lambda v, a: v in a,
        "not_in": lambda v, a: v not in a,
        "gt": lambda v, a: v > a,
        "gte": lambda v, a: v >= a,
        "lt": lambda v, a: v < a,
        "lte": lambda v, a: v <= a,
    }
    return np.array(
        [
            all(
                row[column] is not None and tests[op](row[column], arg)
                for column, condition in filter.items()
                for op, arg in condition.items()
            )
            for row in retriever.artifact.items.to_pylist()
        ]
    )


def brute_force(query: np.ndarray, items: np.ndarray, k: int, banned: np.ndarray) -> list[int]:
    """Item rows of the k best inner products (ties to the lower row), banned rows out."""
    scores = np.where(banned, -np.inf, items.astype(np.float64) @ query.astype(np.float64))
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return [int(i) for i in order if scores[i] > -np.inf]


@pytest.mark.parametrize("exclude_seen", [True, False])
@pytest.mark.parametrize("filter", FILTERS)
def test_filtered_answers_equal_exact_search_over_the_filtered_items(
    retriever, demo_artifact, filter, exclude_seen
):
    _, oracle = demo_artifact
    kept = satisfied(retriever, filter)
    assert 0 < kept.sum() < len(kept)
    rows = list(range(0, 200, 13))
    queries = [
        Query(user=oracle.query_ids[r], k=10, exclude_seen=exclude_seen, filter=filter)
        for r in rows
    ]
    for row, result in zip(rows, retriever.retrieve(queries), strict=True):
        banned = ~kept | (oracle.seen[row] if exclude_seen else False)
        best = brute_force(oracle.query_vectors[row], oracle.item_vectors, 10, banned)
        assert result.items == [oracle.item_ids[i] for i in best]


def test_a_filter_goes_with_exclude_items_and_an_items_neighbours(retriever, demo_artifact):
    _, oracle = demo_artifact
    filter = {"category": {"in": ["c2"]}}
    kept = satisfied(retriever, filter)
    item = int(np.flatnonzero(kept)[0])
    user = oracle.query_ids[5]
    (plain,) = retriever.retrieve([Query(user=user, k=3, filter=filter)])
    answers = retriever.retrieve(
        [
            Query(user=user, k=3, filter=filter, exclude_items=plain.items[:2]),
            Query(item=oracle.item_ids[item], k=5, filter=filter),
        ]
    )
    banned = ~kept | oracle.seen[5]
    banned[[oracle.item_ids.index(i) for i in plain.items[:2]]] = True
    best = brute_force(oracle.query_vectors[5], oracle.item_vectors, 3, banned)
    assert answers[0].items == [oracle.item_ids[i] for i in best]
    banned = ~kept
    banned[item] = True  # an item is never its own neighbour
    best = brute_force(oracle.item_vectors[item], oracle.item_vectors, 5, banned)
    assert answers[1].items == [oracle.item_ids[i] for i in best]


def test_a_batch_of_filters_answers_each_query_as_alone_and_a_bad_one_fails_alone(
    retriever, demo_artifact
):
    _, oracle = demo_artifact
    bad = {"colour": {"in": ["red"]}}
    filters = [FILTERS[0], None, FILTERS[1], bad, FILTERS[0], FILTERS[2], None, FILTERS[1]]
    queries = [
        Query(user=u, k=6, filter=f) for u, f in zip(oracle.query_ids[:8], filters, strict=True)
    ]
    misses = retriever.filters.misses
    together = retriever.retrieve(queries)
    assert retriever.filters.misses - misses <= 3  # each distinct filter computed once at most
    for query, answer in zip(queries, together, strict=True):
        (alone,) = retriever.retrieve([query])
        if query.filter is bad:
            assert isinstance(answer, DataError) and "'colour': no such column" in str(answer)
        else:
            assert (answer.query, answer.items) == (alone.query, alone.items)
            np.testing.assert_allclose(answer.scores, alone.scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(INDEXES))
@pytest.mark.parametrize("limit", [0, 10**6])
def test_every_index_kind_answers_only_items_that_satisfy_the_filter(demo_artifact, kind, limit):
    folder, oracle = demo_artifact
    retriever = Retriever.load(folder)
    index = INDEXES[kind]()
    index.build(retriever.artifact.item_vectors)
    artifact = retriever.artifact
    catalogue = Catalogue.exported(artifact.items, artifact.item_vectors, index, artifact.item_key)
    artifact = dataclasses.replace(artifact, catalogue=catalogue)
    retriever = Retriever(artifact, exact_filter_limit=limit)
    exact = kind == "exact" or (kind != "flat" and limit > 0)  # by itself or the fallback
    for filter in FILTERS:
        kept = satisfied(retriever, filter)
        answers = retriever.retrieve(
            [Query(user=u, k=20, filter=filter) for u in oracle.query_ids[:30]]
        )
        for row, answer in enumerate(answers):
            rows = [oracle.item_ids.index(i) for i in answer.items]
            assert answer.items and kept[rows].all()
            if exact:
                banned = ~kept | oracle.seen[row]
                assert rows == brute_force(
                    oracle.query_vectors[row], oracle.item_vectors, 20, banned
                )


def test_the_service_searches_exactly_below_its_configured_limit(demo_artifact):
    config = ServiceConfig(exact_filter_limit=5)
    with TestClient(create_app(demo_artifact[0], config), client=LOOPBACK) as client:
        assert client.app.state.service.retriever.exact_filter_limit == 5


@pytest.fixture(scope="module")
def client(demo_artifact):
    with TestClient(create_app(demo_artifact[0], ServiceConfig()), client=LOOPBACK) as client:
        yield client


def test_recall_with_a_filter_over_http_equals_the_library(client, retriever, demo_artifact):
    _, oracle = demo_artifact
    user = oracle.query_ids[9]
    for filter in FILTERS:
        response = client.post("/recall", json={"user_id": user, "k": 7, "filter": filter})
        assert response.status_code == 200, response.text
        (expected,) = retriever.retrieve([Query(user=user, k=7, filter=filter)])
        assert response.json()["items"] == expected.items
        assert response.json()["scores"] == expected.scores


def test_a_bad_filter_is_a_422_and_fails_only_its_own_query_in_a_batch(client, demo_artifact):
    user = demo_artifact[1].query_ids[2]
    bad = {"price": {"in": ["cheap"]}}
    response = client.post("/recall", json={"user_id": user, "filter": bad})
    assert response.status_code == 422
    assert "'price' holds numbers, so in takes numbers; got 'cheap'" in response.json()["detail"]
    body = {"queries": [{"user_id": user, "filter": bad}, {"user_id": user, "filter": FILTERS[0]}]}
    response = client.post("/recall/batch", json=body)
    assert response.status_code == 200, response.text
    first, second = response.json()["results"]
    assert first["status"] == 422 and "'price' holds numbers" in first["error"]
    assert second["status"] == 200 and len(second["items"]) == 10


@pytest.mark.parametrize(
    "filter, message",
    [
        ({}, "filter is empty"),
        ({"category": {}}, "filter on 'category': a condition maps one or more of"),
        ({"category": {"lt": 3}}, "'category' holds text, and a range (lt)"),
        ({"genre": {"in": ["x"]}}, "no such column; the filterable columns are 'item_id'"),
        ({"category": {"eq": "c1"}}, "unknown field 'filter.category.eq'"),
        ({"category": {"in": [["c1"]]}}, "filter.category.in.0"),
    ],
)
def test_each_filter_error_over_http_names_its_fault(client, demo_artifact, filter, message):
    body = {"user_id": demo_artifact[1].query_ids[0], "filter": filter}
    response = client.post("/recall", json=body)
    assert response.status_code == 422
    assert message in response.json()["detail"]
