"""A micro-batch answers each query as that query alone would be answered: the gathers,
exclusions, filters and result assembly done over the whole batch change no answer."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from twotower.errors import DataError
from twotower.serving import Retriever
from twotower.serving.batching import MicroBatcher
from twotower.serving.query import Query, Result
from twotower.serving.stores.base import Event


def _same(together: list, alone: list) -> None:
    """Equal answers: the same ids, labels, sources and states, scores to float tolerance."""
    assert len(together) == len(alone)
    for mixed, single in zip(together, alone, strict=True):
        assert type(mixed) is type(single)
        if isinstance(single, DataError):
            assert str(mixed) == str(single)
            continue
        assert (mixed.query, mixed.items) == (single.query, single.items)
        assert (mixed.vector, mixed.state) == (single.vector, single.state)
        if single.interests is None:
            assert mixed.interests is None
        else:  # a multi-interest tower's vectors coincide for a history of 0 or 1 items:
            # which of them found an item is then float rounding's choice
            assert len(mixed.interests) == len(single.interests)
        np.testing.assert_allclose(mixed.scores, single.scores, rtol=1e-5, atol=1e-6)


def _mixed(oracle, retriever: Retriever) -> list[Query]:
    """Known users, cold rows, request-time histories, exclusions, filters and items, each
    kind more than once, some sharing a filter, with a bad query between them."""
    users, items = oracle.query_ids, oracle.item_ids
    row = retriever.artifact.queries.slice(5, 1).to_pylist()[0]
    features = {c: row[c] for c in retriever.query_columns if c in row}
    cheap, some = {"price": {"lt": 15}}, {"category": {"in": ["c1", "c3"]}}
    return [
        Query(user=users[0], k=10),
        Query(user=users[1], k=3, exclude_seen=False),
        Query(user=users[2], k=7, exclude_items=(items[0], items[1], "no-such-item")),
        Query(features=features, k=5),
        Query(features={"segment": "a", "age": 31.0}, k=6, exclude_items=(items[2],)),
        Query(history=[items[3], items[4], items[5]], k=8),
        Query(user=users[3], history=[items[6], items[7]], k=9),
        Query(user=users[4], features={"age": 70.0}, k=4),
        Query(user="nobody"),
        Query(user=users[5], k=10, filter=cheap),
        Query(user=users[6], k=5, filter=cheap, exclude_seen=False),
        Query(features=features, k=4, filter=some, exclude_items=(items[9],)),
        Query(history=[items[8]], k=6, filter=some),
        Query(user=users[7], k=3, filter={"no_such_column": {"in": [1]}}),
        Query(item=items[10], k=5),
        Query(item=items[11], k=4, filter=cheap),
        Query(user=users[8], k=1000),
        Query(user=users[0], k=2),  # the same user again, another k
    ]


@pytest.mark.parametrize("fixture", ["demo_artifact", "interests_artifact"])
def test_one_batch_answers_each_query_as_alone(fixture, request):
    folder, oracle = request.getfixturevalue(fixture)
    retriever = Retriever.load(folder)
    queries = _mixed(oracle, retriever)
    queries = [q for q in queries if q.filter is None or _filterable(retriever)]
    together = retriever.retrieve(queries)
    _same(together, [retriever.retrieve([q])[0] for q in queries])
    assert sum(isinstance(a, Result) for a in together) >= len(queries) - 2


def test_users_whose_state_changed_are_answered_in_a_batch_as_alone(demo_artifact):
    folder, oracle = demo_artifact
    retriever = Retriever.load(folder)
    users, items = oracle.query_ids, oracle.item_ids
    retriever.ingest([Event(users[0], items[12], 1e9), Event(users[2], items[13], 1e9)])
    queries = [Query(user=users[i], k=10, exclude_seen=i != 1) for i in range(4)]
    queries += [Query(user=users[0], k=5, exclude_items=(items[14],))]
    together = retriever.retrieve(queries)
    _same(together, [retriever.retrieve([q])[0] for q in queries])
    assert items[12] not in together[0].items  # its new item counts as seen


def test_the_micro_batcher_answers_concurrent_requests_as_each_alone(retriever, demo_artifact):
    """Requests queued together through the batcher, one query or several each."""
    _, oracle = demo_artifact
    queries = _mixed(oracle, retriever)
    requests = [queries[i : i + 3] for i in range(0, len(queries), 3)]
    batcher = MicroBatcher(lambda: retriever, max_queries=256)
    batcher.start()

    async def every():
        return await asyncio.gather(*(batcher.submit(r) for r in requests))

    try:
        answers = asyncio.run(every())
    finally:
        batcher.stop()
    together = [answer for answers_of, _ in answers for answer in answers_of]
    _same(together, [retriever.retrieve([q])[0] for q in queries])


def _filterable(retriever: Retriever) -> bool:
    return {"price", "category"} <= set(retriever.artifact.items.column_names)
