"""Events change users' states: the next answer is the one the same interaction would
give had it been in the log at export; over HTTP, POST /events with its refusals,
tokens and readiness."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from twotower.data.dataset import ITEM_IDX, QUERY_IDX, TIMESTAMP
from twotower.data.matrix import interaction_matrix
from twotower.serving import Retriever
from twotower.serving.http import create_app
from twotower.serving.query import Query
from twotower.serving.settings import ServiceConfig
from twotower.serving.stores import Event, MemoryStore, merge_recent
from twotower.sources import load_data
from twotower.towers.model import embed_rows
from twotower.training.run import load_model

LOOPBACK = ("127.0.0.1", 50000)
REMOTE = ("203.0.113.7", 50000)


def offline_answer(run_dir, user_row: int, item_row: int, timestamp: float, k: int):
    """The items the trained model gives ``user_row`` had (user, item, timestamp) been
    the last row of the log: histories refit on it, its item seen."""
    config, pipeline, model = load_model(run_dir)
    dataset, _ = load_data(config)
    log = dataset.interactions
    row = {QUERY_IDX: [user_row], ITEM_IDX: [item_row]}
    if TIMESTAMP in log.column_names:
        row[TIMESTAMP] = [timestamp]
    extra = pa.table(row).cast(log.select(list(row)).schema)
    log = pa.concat_tables([log.select(list(row)), extra])
    served = pipeline.with_histories(dataset, log)
    query = embed_rows(model.query_tower, served, "query", dataset.queries.slice(user_row, 1))
    items = embed_rows(model.item_tower, served, "item", dataset.items).numpy()
    seen = interaction_matrix(log, dataset.num_queries, dataset.num_items).toarray()[user_row] > 0
    scores = items @ query.numpy()[0]
    scores[seen] = -np.inf
    best = np.argsort(-scores, kind="stable")[:k]
    ids = dataset.items.column(dataset.item_key).to_pylist()
    return [ids[i] for i in best], scores[best]


def latest_time(retriever: Retriever) -> float:
    times = retriever.artifact.recent.times
    return float(np.nanmax(times)) + 1.0 if np.isfinite(times).any() else 0.0


@pytest.mark.parametrize("fixture", ["demo_artifact", "sequence_artifact", "timed_artifact"])
def test_an_event_changes_the_next_answer_as_the_same_row_in_the_log_would(fixture, request):
    folder, oracle = request.getfixturevalue(fixture)
    retriever = Retriever.load(folder)
    user_row = 7
    item_row = int(np.flatnonzero(~oracle.seen[user_row])[0])  # an item it never had
    user, item = oracle.query_ids[user_row], oracle.item_ids[item_row]
    (before,) = retriever.recall_users([user], 10)
    when = latest_time(retriever)
    retriever.store.append([Event(user, item, when)], retriever.artifact.pipeline.recent_length)
    (after,) = retriever.recall_users([user], 10)
    expected, scores = offline_answer(oracle.run_dir, user_row, item_row, when, 10)
    assert after.items == expected and item not in after.items
    np.testing.assert_allclose(after.scores, scores, rtol=1e-5, atol=1e-6)
    assert after.items != before.items and after.state == {
        "features": "stored",
        "history": "stored",
    }


def test_the_memory_store_follows_the_merge_rule_and_takes_a_repeated_event_once(demo_artifact):
    folder, oracle = demo_artifact
    retriever = Retriever.load(folder)
    store = retriever.store
    width = retriever.artifact.pipeline.recent_length
    user = oracle.query_ids[2]
    (exported,) = store.read([user]).recent
    events = [Event(user, oracle.item_ids[i], t) for i, t in ((5, 1e12), (6, 1e12), (9, 5.0))]
    store.append(events, width)
    store.append(events[:1], width)  # sent again: taken once
    (now,) = store.read([user]).recent
    pairs = [(e.item, e.timestamp) for e in events]
    assert now == merge_recent(exported, pairs, width)
    assert now[:2] == [(oracle.item_ids[6], 1e12), (oracle.item_ids[5], 1e12)]
    (seen,) = store.read([user]).seen
    assert {oracle.item_ids[i] for i in (5, 6, 9)} <= set(seen)


def test_events_start_a_user_the_artifact_does_not_know(demo_artifact):
    folder, oracle = demo_artifact
    retriever = Retriever.load(folder)
    with pytest.raises(Exception, match="unknown query id"):
        retriever.recall_users(["newcomer"], 5)
    items = [oracle.item_ids[i] for i in (1, 4, 8)]
    width = retriever.artifact.pipeline.recent_length
    retriever.store.append([Event("newcomer", i, 10.0 + n) for n, i in enumerate(items)], width)
    (result,) = retriever.recall_users(["newcomer"], 5)
    (by_request,) = retriever.retrieve(
        [Query(features={}, history=items, history_times=[10.0, 11.0, 12.0], k=5)]
    )
    assert result.items == by_request.items and not set(items) & set(result.items)
    assert result.state == {"features": "none", "history": "stored"}


def test_a_reload_hands_the_memory_states_on(demo_artifact):
    folder, oracle = demo_artifact
    retriever = Retriever.load(folder)
    user, item = oracle.query_ids[3], oracle.item_ids[11]
    width = retriever.artifact.pipeline.recent_length
    retriever.store.append([Event(user, item, 1e12)], width)
    assert isinstance(retriever.store, MemoryStore)
    reloaded = Retriever(retriever.artifact, store=retriever.store.carried(retriever.artifact))
    assert reloaded.recall_users([user], 10) == retriever.recall_users([user], 10)
    (state,) = reloaded.store.read([user]).recent
    assert state[0] == (item, 1e12) and [e for e in state if e == (item, 1e12)] == [state[0]]


def test_post_events_stores_the_known_items_and_refuses_the_others_by_name(demo_artifact):
    folder, oracle = demo_artifact
    user, item = oracle.query_ids[9], oracle.item_ids[2]
    body = {
        "events": [
            {"user": user, "item": "no-such-item", "timestamp": 1e12},
            {"user": user, "item": item, "timestamp": 1e12},
        ]
    }
    with TestClient(create_app(folder), client=LOOPBACK) as client:
        before = client.post("/recall", json={"user_id": user, "k": 10}).json()
        answer = client.post("/events", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["stored"] == 1
        assert answer.json()["refused"] == [{"index": 0, "error": "unknown item id 'no-such-item'"}]
        after = client.post("/recall", json={"user_id": user, "k": 10}).json()
        metrics = client.get("/metrics").text
    retriever = Retriever.load(folder)
    retriever.store.append([Event(user, item, 1e12)], retriever.artifact.pipeline.recent_length)
    (expected,) = retriever.recall_users([user], 10)
    assert after["items"] == expected.items != before["items"]
    assert 'twotower_events_total{outcome="stored"} 1.0' in metrics
    assert 'twotower_events_total{outcome="refused"} 1.0' in metrics


def test_post_events_needs_a_token_or_loopback(demo_artifact):
    folder, oracle = demo_artifact
    body = {"events": [{"user": oracle.query_ids[0], "item": oracle.item_ids[0]}]}
    with TestClient(create_app(folder), client=REMOTE) as client:
        assert client.post("/events", json=body).status_code == 403
    config = ServiceConfig(admin_token="admin-token-of-16+", ingest_token="ingest-token-of-16+")
    with TestClient(create_app(folder, config), client=REMOTE) as client:
        assert client.post("/events", json=body).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert client.post("/events", json=body, headers=wrong).status_code == 403
        for token in ("ingest-token-of-16+", "admin-token-of-16+"):
            headers = {"Authorization": f"Bearer {token}"}
            answer = client.post("/events", json=body, headers=headers)
            assert answer.status_code == 200 and answer.json()["stored"] == 1
        ingest = {"Authorization": "Bearer ingest-token-of-16+"}
        assert client.post("/admin/reload", headers=ingest).status_code == 403


def test_a_request_history_wins_over_the_stored_one_and_says_so(demo_artifact):
    folder, oracle = demo_artifact
    user = oracle.query_ids[4]
    history = [oracle.item_ids[i] for i in (20, 21)]
    body = {"user_id": user, "history": history, "history_times": [1.0, 2.0], "k": 10}
    with TestClient(create_app(folder), client=LOOPBACK) as client:
        answer = client.post("/recall", json=body).json()
        unknown = client.post("/recall", json={**body, "history": ["nope", history[0]]})
        ready = client.get("/ready").json()
    assert answer["state"] == {"features": "stored", "history": "request"}
    assert not set(history) & set(answer["items"])
    assert unknown.status_code == 404 and "'nope'" in unknown.json()["detail"]
    assert ready["store"] == "memory" and ready["status"] == "ready"
