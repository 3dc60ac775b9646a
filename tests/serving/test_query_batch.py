"""``QueryBatch.plan``: each query goes to the source ``Query.source`` names, or fails
with its error, whatever fields a batch's queries mix."""

from __future__ import annotations

import itertools

import numpy as np

from twotower.errors import DataError
from twotower.serving.query import SOURCES, Query
from twotower.serving.query_batch import GIVEN, QueryBatch

VALUES = {"user": 7, "features": {"age": 3}, "text": "red", "item": 11, "history": [1, 2]}


def test_every_mix_of_fields_is_planned_as_query_source_names_it():
    queries = [
        Query(**{name: VALUES[name] for name in fields}, k=5)
        for count in range(len(GIVEN) + 1)
        for fields in itertools.combinations(GIVEN, count)
    ]
    queries += [Query(user=1, k=0), Query(user=1, k=2**70), Query(user=1, k=True)]
    batch = QueryBatch(queries, dim=4, interests=1)
    groups = batch.plan(num_items=100)
    planned = {int(p): name for name, positions in groups.items() for p in positions}
    assert len(planned) == sum(map(len, groups.values()))  # one source at most each
    for position, query in enumerate(queries):
        try:
            if isinstance(query.k, bool) or query.k < 1:
                raise DataError("k")
            expected = query.source
        except DataError:
            assert position not in planned and isinstance(batch.out[position], DataError)
            continue
        assert planned[position] == expected and batch.out[position] is None
    assert set(groups) == set(SOURCES)
    np.testing.assert_array_equal(batch.ks[-3:-1], [1, 100])  # a huge k: at most the corpus
