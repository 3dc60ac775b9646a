"""The retriever against the trained model itself: brute-force top k over its own vectors."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest

from twotower.errors import DataError
from twotower.features.history import Recent
from twotower.serving import Artifact, Result, Retriever, UnknownItemError, UnknownQueryError
from twotower.serving.query import Query
from twotower.towers.model import embed_inputs, embed_rows
from twotower.training.run import load_model


def stored_history(retriever: Retriever, user: dict) -> dict:
    """A known user's stored history as a request gives it: item ids oldest first, and
    their timestamps."""
    (entries,) = retriever.store.read([user["user_id"]]).recent
    items = [item for item, _ in reversed(entries)]
    times = [time for _, time in reversed(entries)]
    return {"history": items, "history_times": None if np.isnan(times).any() else times}


def brute_force(query: np.ndarray, items: np.ndarray, k: int, banned=None) -> list[int]:
    """Item rows of the k best inner products (ties to the lower row), banned rows left out."""
    scores = items.astype(np.float64) @ query.astype(np.float64)  # (N,)
    if banned is not None:
        scores[banned] = -np.inf
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return [int(i) for i in order if scores[i] > -np.inf]


def expected_items(oracle, rows: list[int], k: int, exclude_seen: bool, extra=()) -> list[list]:
    answers = []
    for row in rows:
        banned = oracle.seen[row].copy() if exclude_seen else np.zeros(len(oracle.item_ids), bool)
        banned[list(extra)] = True
        best = brute_force(oracle.query_vectors[row], oracle.item_vectors, k, banned)
        answers.append([oracle.item_ids[i] for i in best])
    return answers


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_recall_users_equals_the_trained_model_by_brute_force(
    retriever, demo_artifact, exclude_seen
):
    _, oracle = demo_artifact
    rows = list(range(0, 200, 9))
    users = [oracle.query_ids[r] for r in rows]
    results = retriever.recall_users(users, 10, exclude_seen=exclude_seen)
    assert [r.query for r in results] == users
    assert [r.items for r in results] == expected_items(oracle, rows, 10, exclude_seen)
    for row, result in zip(rows, results, strict=True):
        rows_of = [oracle.item_ids.index(i) for i in result.items]
        expected = oracle.item_vectors[rows_of] @ oracle.query_vectors[row]
        np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-6)
        assert result.scores == sorted(result.scores, reverse=True)


def test_a_transformer_history_serves_what_the_trained_model_computes(sequence_artifact):
    """The artifact's query tower alone (its causal blocks included) gives the model's
    own answers, with every logged interaction in the served histories."""
    folder, oracle = sequence_artifact
    rows = list(range(0, 200, 9))
    results = Retriever.load(folder).recall_users([oracle.query_ids[r] for r in rows], 10)
    assert [r.items for r in results] == expected_items(oracle, rows, 10, exclude_seen=True)


def test_attention_with_time_gaps_serves_what_the_trained_model_computes(timed_artifact):
    """The artifact carries the histories' timestamps: the served vectors are the model's."""
    folder, oracle = timed_artifact
    retriever = Retriever.load(folder)
    table = retriever.artifact.queries.slice(0, 5)
    inputs = retriever.artifact.pipeline.transform("query", table)
    times = inputs["history:times"].numpy()
    assert (times[:, 0] > 0).all() and (
        np.diff(times, axis=1)[inputs["history"][:, 1:] > 0] <= 0
    ).all()
    rows = list(range(0, 200, 9))
    results = retriever.recall_users([oracle.query_ids[r] for r in rows], 10)
    assert [r.items for r in results] == expected_items(oracle, rows, 10, exclude_seen=True)


def brute_force_interests(queries: np.ndarray, items: np.ndarray, k: int, banned):
    """Item rows and the interest that found each, by the best of K inner products."""
    by_interest = items.astype(np.float64) @ queries.astype(np.float64).T  # (N, K)
    scores = by_interest.max(axis=1)
    scores[banned] = -np.inf
    order = [int(i) for i in np.lexsort((np.arange(len(scores)), -scores))[:k]]
    return order, [int(by_interest[i].argmax()) for i in order], scores[order]


def test_a_multi_interest_artifact_serves_each_items_best_interest(interests_artifact):
    """Known users: the merged search over K vectors equals brute force over the model's
    own (Q, K, D) vectors, and names the interest that found each item; an item query
    uses its one vector and names none."""
    folder, oracle = interests_artifact
    assert oracle.query_vectors.shape[1:] == (3, oracle.item_vectors.shape[1])
    retriever = Retriever.load(folder)
    assert retriever.interests == 3
    rows = list(range(0, 200, 9))
    results = retriever.recall_users([oracle.query_ids[r] for r in rows], 10)
    found = set()
    for row, result in zip(rows, results, strict=True):
        best, interests, scores = brute_force_interests(
            oracle.query_vectors[row], oracle.item_vectors, 10, oracle.seen[row]
        )
        assert result.items == [oracle.item_ids[i] for i in best]
        assert result.interests == interests
        np.testing.assert_allclose(result.scores, scores, rtol=1e-5, atol=1e-6)
        found |= set(interests)
    assert len(found) > 1  # the interests do find different items
    similar = retriever.similar_items(oracle.item_ids[3], 5)
    assert similar.interests is None and len(similar.items) == 5
    user = retriever.artifact.queries.slice(4, 1).to_pylist()[0]
    (row,) = retriever.retrieve(
        [Query(features=user, k=10, exclude_seen=False, **stored_history(retriever, user))]
    )
    best, interests, _ = brute_force_interests(
        oracle.query_vectors[4], oracle.item_vectors, 10, np.zeros(len(oracle.item_ids), bool)
    )
    assert row.items == [oracle.item_ids[i] for i in best] and row.interests == interests


def test_seen_items_are_never_returned(retriever, demo_artifact):
    _, oracle = demo_artifact
    N = len(oracle.item_ids)
    results = retriever.recall_users(oracle.query_ids, N)  # the whole corpus, ranked
    for row, result in enumerate(results):
        seen = {oracle.item_ids[i] for i in np.flatnonzero(oracle.seen[row])}
        assert not seen & set(result.items)
        assert len(result.items) == N - len(seen)


def test_exclude_items_are_honoured_and_unknown_ones_ignored(retriever, demo_artifact):
    _, oracle = demo_artifact
    user = oracle.query_ids[5]
    (before,) = retriever.recall_users([user], 7)
    dropped = before.items[:2]
    (after,) = retriever.recall_users([user], 5, exclude_items=[*dropped, 10**9])
    assert after.items == before.items[2:]
    (same,) = retriever.recall_users([user], 5, exclude_items=[str(i) for i in dropped] + ["x"])
    assert same == after
    rows = [oracle.item_ids.index(i) for i in dropped]
    assert [after.items] == expected_items(oracle, [5], 5, True, rows)


def test_ids_are_matched_by_value_and_labelled_with_the_stored_key(retriever, demo_artifact):
    _, oracle = demo_artifact
    user = oracle.query_ids[3]
    typed = retriever.recall_users([user], 5)[0]
    as_text = retriever.recall_users([str(user), f" {user}"], 5)
    assert all(r.items == typed.items and r.query == user for r in as_text)
    assert type(as_text[0].query) is int
    item = oracle.item_ids[9]
    assert retriever.similar_items(str(item), 3) == retriever.similar_items(item, 3)
    assert retriever.similar_items(str(item), 3).query == item


def test_unknown_users_are_named(retriever, demo_artifact):
    _, oracle = demo_artifact
    with pytest.raises(UnknownQueryError, match="unknown query id.*123456.*'someone'") as err:
        retriever.recall_users([oracle.query_ids[0], 123456, "someone"], 5)
    assert err.value.ids == [123456, "someone"]
    assert isinstance(err.value, DataError)


def test_recall_rows_of_a_new_user_equals_the_model_with_an_unseen_id(retriever, demo_artifact):
    _, oracle = demo_artifact
    known = retriever.artifact.queries.slice(4, 2)
    new = known.set_column(0, "user_id", pa.array([-1, -2], pa.int64()))
    assert known.column_names[0] == "user_id"
    results = retriever.recall_rows(new, 10)
    # an unknown user: out-of-vocabulary id and empty history, in the trained pipeline too
    _, pipeline, model = load_model(oracle.run_dir)
    vectors = embed_rows(model.query_tower, pipeline, "query", new).numpy()
    for vector, result in zip(vectors, results, strict=True):
        best = brute_force(vector, oracle.item_vectors, 10)
        assert result.items == [oracle.item_ids[i] for i in best]
    assert [r.query for r in results] == [-1, -2]


@pytest.mark.parametrize(
    "fixture", ["demo_artifact", "sequence_artifact", "timed_artifact", "interests_artifact"]
)
def test_a_request_carrying_a_users_rows_and_history_is_answered_as_that_user(fixture, request):
    """A request with a known user's feature values and history (and timestamps), as a
    new user would send them, gets the items and scores the trained model gives that
    user offline (its exported history through the fitted features)."""
    folder, oracle = request.getfixturevalue(fixture)
    retriever = Retriever.load(folder)
    rows = list(range(0, 60, 7))
    users = retriever.artifact.queries.take(rows).to_pylist()
    queries = [
        Query(features=user, k=8, exclude_seen=False, **stored_history(retriever, user))
        for user in users
    ]
    by_request = retriever.retrieve(queries)
    by_ids = retriever.recall_users([u["user_id"] for u in users], 8, exclude_seen=False)
    for row, got, want in zip(rows, by_request, by_ids, strict=True):
        assert got.items == want.items and got.interests == want.interests
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-6)
        assert got.state == {"features": "request", "history": "request"}
        assert want.state == {"features": "stored", "history": "stored"}
        vector = oracle.query_vectors[row]
        if vector.ndim == 1:  # the offline vector, by brute force
            best = brute_force(vector, oracle.item_vectors, 8)
            assert got.items == [oracle.item_ids[i] for i in best]


def test_features_without_a_history_are_a_user_with_none(retriever, demo_artifact):
    """Raw feature values alone carry no history, even with a known user's key: the
    stored state is read only for ``user``."""
    _, oracle = demo_artifact
    user = retriever.artifact.queries.slice(10, 1).to_pylist()[0]
    (result,) = retriever.retrieve([Query(features=user, k=8)])
    no_history = dict(user, user_id=-1)
    _, pipeline, model = load_model(oracle.run_dir)
    vector = embed_rows(model.query_tower, pipeline, "query", pa.Table.from_pylist([no_history]))
    best = brute_force(vector.numpy()[0], oracle.item_vectors, 8)
    assert result.state == {"features": "request", "history": "none"}
    (anonymous,) = retriever.retrieve([Query(features=no_history, k=8)])
    assert anonymous.items == [oracle.item_ids[i] for i in best]


@pytest.mark.parametrize(
    "fixture", ["demo_artifact", "sequence_artifact", "timed_artifact", "interests_artifact"]
)
def test_recall_rows_answers_as_its_rows_through_the_tower_and_one_search(fixture, request):
    """``recall_rows`` asks ``retrieve`` with one ``Query(features=...)`` per row: the
    answers are the rows' own columns (and no history) through the query tower and one
    index search (columns no feature reads left out), labelled with each row's key."""
    folder, _ = request.getfixturevalue(fixture)
    retriever = Retriever.load(folder)
    artifact = retriever.artifact
    rows = artifact.queries.slice(3, 6)
    results = retriever.recall_rows(rows.append_column("unread", pa.array(range(6))), 7)
    pipeline = artifact.pipeline
    none = Recent.empty(rows.num_rows, pipeline.recent_length)
    inputs = pipeline.transform("query", rows, none, artifact.history_codes)
    vectors = embed_inputs(artifact.query_tower, [inputs]).numpy()
    if vectors.ndim == 3:
        ids, scores, interests = artifact.index.search_interests(vectors, 7, None)
    else:
        (ids, scores), interests = artifact.index.search(vectors, 7, None), None
    item_ids = artifact.item_ids.to_pylist()
    for b, result in enumerate(results):
        assert result.items == [item_ids[i] for i in ids[b]]
        np.testing.assert_allclose(result.scores, scores[b], rtol=1e-5, atol=1e-6)
        assert result.interests == (None if interests is None else interests[b].tolist())
        assert result.vector == "tower"
    assert [r.query for r in results] == rows.column(artifact.query_key).to_pylist()
    features = [{c: row[c] for c in retriever.query_columns} for row in rows.to_pylist()]
    answers = retriever.retrieve([Query(features=f, k=7) for f in features])
    assert [(a.items, a.scores, a.interests) for a in answers] == [
        (r.items, r.scores, r.interests) for r in results
    ]


def test_recall_rows_converts_its_values_to_the_stored_types_as_a_request_row(retriever):
    """Values convert where nothing is lost (ages as text); one that does not is refused
    with the error a request's row gets."""
    rows = retriever.artifact.queries.slice(0, 2)
    at = rows.schema.get_field_index("age")
    ages = [None if age is None else str(age) for age in rows.column("age").to_pylist()]
    as_text = rows.set_column(at, "age", pa.array(ages, pa.string()))
    assert retriever.recall_rows(as_text, 3) == retriever.recall_rows(rows, 3)
    bad = rows.set_column(at, "age", pa.array(["30", "old"]))
    with pytest.raises(DataError, match="feature 'age': 'old' is not a valid double"):
        retriever.recall_rows(bad, 3)


def test_recall_rows_names_every_missing_column(retriever):
    rows = retriever.artifact.queries.select(["user_id", "sessions"]).slice(0, 1)
    with pytest.raises(DataError, match="lack column\\(s\\) 'segment', 'age', which"):
        retriever.recall_rows(rows, 5)


def test_recall_text_without_a_query_text_feature_is_refused(retriever):
    with pytest.raises(DataError, match="query side has no text feature"):
        retriever.recall_text(["red shoes"], 5)


def test_recall_text_equals_the_model_on_that_text(text_artifact):
    folder, run_dir = text_artifact
    retriever = Retriever.load(folder)
    texts = ["red shoes", "Blue HAT!", "nothing known"]
    results = retriever.recall_text(texts, 5)
    assert [r.query for r in results] == texts
    _, pipeline, model = load_model(run_dir)
    table = pa.table({"text": texts})
    queries = embed_rows(model.query_tower, pipeline, "query", table).numpy()
    items = retriever.artifact.item_vectors
    item_ids = retriever.artifact.item_ids.to_pylist()
    for query, result in zip(queries, results, strict=True):
        assert result.items == [item_ids[i] for i in brute_force(query, items, 5)]
    assert retriever.recall_rows(table, 5)[0].items == results[0].items


def test_similar_items_never_returns_the_item_itself(retriever, demo_artifact):
    _, oracle = demo_artifact
    for row in (0, 17, 99):
        item = oracle.item_ids[row]
        result = retriever.similar_items(item, 10)
        assert result.query == item and item not in result.items
        banned = np.zeros(len(oracle.item_ids), bool)
        banned[row] = True
        best = brute_force(oracle.item_vectors[row], oracle.item_vectors, 10, banned)
        assert result.items == [oracle.item_ids[i] for i in best]
    assert len(retriever.similar_items(oracle.item_ids[0], 100).items) == 99
    with pytest.raises(UnknownItemError, match="unknown item id.*-5"):
        retriever.similar_items(-5, 3)


@pytest.mark.parametrize("k", [0, -3, True, 2.0, "5"])
def test_k_must_be_a_positive_integer(retriever, demo_artifact, k):
    _, oracle = demo_artifact
    with pytest.raises(DataError, match="k must be an integer >= 1"):
        retriever.recall_users(oracle.query_ids[:1], k)


def test_k_above_the_corpus_returns_every_item_left(retriever, demo_artifact):
    _, oracle = demo_artifact
    (everything,) = retriever.recall_users(oracle.query_ids[:1], 10**6, exclude_seen=False)
    assert sorted(everything.items) == sorted(oracle.item_ids)
    (unseen,) = retriever.recall_users(oracle.query_ids[:1], 101)
    assert len(unseen.items) == len(oracle.item_ids) - oracle.seen[0].sum()


def test_results_are_json_ready_and_empty_requests_are_empty(retriever, demo_artifact):
    _, oracle = demo_artifact
    (result,) = retriever.recall_users(oracle.query_ids[:1], 3)
    assert isinstance(result, Result)
    decoded = json.loads(json.dumps(dataclasses.asdict(result)))
    assert decoded == {
        "query": result.query,
        "items": result.items,
        "scores": result.scores,
        "interests": None,  # a single-vector model
        "vector": "tower",  # computed by the query tower
        "state": {"features": "stored", "history": "stored"},  # as exported
    }
    assert all(type(i) is int for i in result.items)
    assert retriever.recall_users([], 3) == []
    assert retriever.recall_rows(retriever.artifact.queries.slice(0, 0), 3) == []


def test_concurrent_reads_give_the_sequential_answers(retriever, demo_artifact):
    _, oracle = demo_artifact
    batches = [oracle.query_ids[i : i + 5] for i in range(0, 60, 5)]
    sequential = [retriever.recall_users(b, 10) for b in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda b: retriever.recall_users(b, 10), batches))
    assert threaded == sequential


def test_one_mixed_retrieve_equals_each_query_alone(retriever, demo_artifact):
    _, oracle = demo_artifact
    features = {"user_id": -1, "segment": "a", "age": 44.0, "sessions": 3.0}
    queries = [
        Query(user=oracle.query_ids[3], k=4),
        Query(item=oracle.item_ids[8], k=6),
        Query(user="nobody"),
        Query(features=features, k=3, exclude_items=(oracle.item_ids[0],)),
        Query(user=oracle.query_ids[9], k=12, exclude_seen=False),
        Query(features={"age": "old"}),
        Query(item=-99),
        Query(text="red shoes"),
        Query(user=oracle.query_ids[3], k=0),
        Query(user=1, text="both"),
    ]
    together = retriever.retrieve(queries)
    alone = [retriever.retrieve([q])[0] for q in queries]
    for mixed, single in zip(together, alone, strict=True):
        assert type(mixed) is type(single)
        if isinstance(single, Result):
            assert (mixed.query, mixed.items) == (single.query, single.items)
            np.testing.assert_allclose(mixed.scores, single.scores, rtol=1e-5, atol=1e-6)
        else:
            assert str(mixed) == str(single)
    kinds = [type(a).__name__ for a in together]
    assert kinds == [
        "Result",
        "Result",
        "UnknownQueryError",
        "Result",
        "Result",
        "DataError",
        "UnknownItemError",
        "DataError",
        "DataError",
        "DataError",
    ]
    assert len(together[4].items) == 12 and together[3].query == -1
    assert oracle.item_ids[0] not in together[3].items
    assert "exactly one of user, features, text, item; got user, text" in str(together[9])


def test_retrieve_of_nothing_is_nothing(retriever):
    assert retriever.retrieve([]) == []


@pytest.mark.parametrize(
    "fixture", ["demo_artifact", "sequence_artifact", "timed_artifact", "interests_artifact"]
)
def test_known_users_inputs_kept_in_memory_give_the_transformed_answers(fixture, request):
    """The known users' inputs, transformed once at load and gathered per request, give
    the answers of transforming each request's rows (every history encoder, and K > 1)."""
    folder, oracle = request.getfixturevalue(fixture)
    artifact = Artifact.load(folder)
    kept, transformed = Retriever(artifact), Retriever(artifact, input_budget=0)
    assert kept.known_inputs is not None and transformed.known_inputs is None
    users = list(oracle.query_ids)
    for a, b in zip(kept.recall_users(users, 10), transformed.recall_users(users, 10), strict=True):
        assert a.items == b.items and a.interests == b.interests
        assert np.allclose(a.scores, b.scores, atol=1e-5)


@pytest.mark.parametrize(
    "fixture", ["demo_artifact", "sequence_artifact", "timed_artifact", "interests_artifact"]
)
def test_a_known_users_request_history_on_kept_inputs_gives_its_states_answers(
    fixture, request, monkeypatch
):
    """A known user whose request brings its latest items is embedded from its kept
    inputs with only the history features transformed: the answers, states and errors
    of its whole state transformed (every history encoder, timestamps, K > 1)."""
    folder, oracle = request.getfixturevalue(fixture)
    kept, transformed = (
        Retriever(Artifact.load(folder)),
        Retriever(Artifact.load(folder), input_budget=0),
    )

    def no_row_transform(*args, **kwargs):
        raise AssertionError("the kept inputs were not used")

    monkeypatch.setattr(kept.artifact.pipeline, "transform", no_row_transform)
    rng = np.random.default_rng(0)
    users, items = list(oracle.query_ids)[:40], list(oracle.item_ids)
    queries = []
    for n, user in enumerate(users):
        history = [items[i] for i in rng.choice(len(items), n % 5)]  # 0 to 4 items
        times = rng.uniform(0, 1e6, len(history)).tolist()  # in no order: sorted by them
        queries.append(
            Query(user=user, history=history, history_times=times, k=10, exclude_seen=n % 3 > 0)
        )
    queries += [
        Query(user=users[0], history=[items[0], "no such item", -5], history_times=[1, 2, 3]),
        Query(user=users[1], history=[items[0]], history_times=[1.0, 2.0]),
        Query(user=users[2], history=[items[3]], history_times=[float("nan")]),
    ]
    answers, expected = kept.retrieve(queries), transformed.retrieve(queries)
    assert sum(isinstance(a, DataError) for a in expected) == 3
    for a, b in zip(answers, expected, strict=True):
        if isinstance(b, DataError):
            assert type(a) is type(b) and str(a) == str(b)
            continue
        assert (a.query, a.items, a.interests, a.state) == (b.query, b.items, b.interests, b.state)
        assert np.allclose(a.scores, b.scores, atol=1e-5)
    assert answers[5].state == {"features": "stored", "history": "request"}
    assert set(queries[5].history).isdisjoint(answers[5].items)


def test_an_item_bias_is_served_as_the_vectors_last_coordinate(item_bias_artifact):
    """``model.item_bias``: an exported run's item vectors end with each item's learned
    bias and a known user's query vector with 1, so the service's answers are the model's
    own (cosine + bias) ranking; an item asked for its similar items stands as a query
    (ending with 1), so they rank by cosine plus the other item's bias, not times its own.
    """
    folder, oracle = item_bias_artifact
    assert oracle.item_vectors.shape[1] == 17 and np.all(oracle.query_vectors[:, -1] == 1.0)
    assert np.abs(oracle.item_vectors[:, -1]).max() > 1e-3  # the biases were learned
    retriever = Retriever.load(folder)
    rows = list(range(0, 200, 7))
    results = retriever.recall_users([oracle.query_ids[r] for r in rows], 10)
    expected = expected_items(oracle, rows, 10, exclude_seen=True)
    assert [result.items for result in results] == expected
    for row in (0, 42):
        as_query = oracle.item_vectors[row].copy()
        as_query[-1] = 1.0
        banned = np.zeros(len(oracle.item_ids), bool)
        banned[row] = True
        best = brute_force(as_query, oracle.item_vectors, 10, banned)
        similar = retriever.similar_items(oracle.item_ids[row], 10)
        assert similar.items == [oracle.item_ids[i] for i in best]
