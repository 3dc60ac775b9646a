"""The HTTP service against the library: same answers, a 4xx for every bad request."""

from __future__ import annotations

import dataclasses
import json
import re

import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from twotower.serving import Retriever
from twotower.serving.http import ServiceConfig, create_app
from twotower.serving.schemas import MAX_BATCH, MAX_K
from twotower.serving.state import answered_by

LOOPBACK = ("127.0.0.1", 50000)


@pytest.fixture(scope="module")
def client(demo_artifact):
    app = create_app(demo_artifact[0], ServiceConfig(max_body_bytes=4096))
    with TestClient(app, client=LOOPBACK) as client:
        yield client


@pytest.fixture(scope="module")
def text_client(text_artifact):
    with TestClient(create_app(text_artifact[0]), client=LOOPBACK) as client:
        yield client


def _items(result) -> dict:
    return {
        "query": result.query,
        "items": result.items,
        "scores": result.scores,
        "interests": result.interests,
        "vector": result.vector,
        "state": result.state,
    }


def test_recall_of_known_users_equals_the_library(client, retriever, demo_artifact):
    _, oracle = demo_artifact
    served = answered_by(retriever.artifact)  # its fingerprint and version
    for user, k, exclude_seen in [(oracle.query_ids[0], 10, True), (oracle.query_ids[7], 3, False)]:
        body = {"user_id": user, "k": k, "exclude_seen": exclude_seen}
        response = client.post("/recall", json=body)
        assert response.status_code == 200, response.text
        (expected,) = retriever.recall_users([user], k, exclude_seen=exclude_seen)
        assert response.json() == {**served, **_items(expected)}


def test_exclude_items_and_text_ids(client, retriever, demo_artifact):
    _, oracle = demo_artifact
    user = oracle.query_ids[4]
    (before,) = retriever.recall_users([user], 6)
    body = {"user_id": str(user), "k": 4, "exclude_items": [before.items[0], str(before.items[1])]}
    answer = client.post("/recall", json=body).json()
    assert answer["items"] == before.items[2:6]
    assert answer["query"] == user


def test_recall_of_new_users_by_features_equals_recall_rows(client, retriever):
    features = {"user_id": -7, "segment": "b", "age": 31.5, "sessions": 12.0}
    answer = client.post("/recall", json={"features": features, "k": 8}).json()
    columns = {name: [features.get(name)] for name in retriever.query_columns}
    table = pa.table(
        columns, schema=pa.schema([retriever.artifact.queries.schema.field(c) for c in columns])
    )
    (expected,) = retriever.recall_rows(table, 8)
    assert answer["items"] == expected.items and answer["query"] == -7
    partial = client.post("/recall", json={"features": {"segment": "b"}, "k": 8}).json()
    missing = table.set_column(2, "age", pa.array([None], pa.float64()))
    missing = missing.set_column(3, "sessions", pa.array([None], pa.float64()))
    missing = missing.set_column(0, "user_id", pa.array([None], pa.int64()))
    assert partial["items"] == retriever.recall_rows(missing, 8)[0].items
    assert partial["query"] is None


def test_text_queries_equal_the_library(text_client, text_artifact):
    retriever = Retriever.load(text_artifact[0])
    answer = text_client.post("/recall", json={"text": "red shoes", "k": 5}).json()
    (expected,) = retriever.recall_text(["red shoes"], 5)
    assert answer["items"] == expected.items and answer["query"] == "red shoes"


def test_an_artifact_keyed_by_floats_answers_with_its_keys(float_key_artifact):
    """Item keys are answered as stored: the response model declares float keys too,
    so such a corpus is not a 500."""
    (expected,) = Retriever.load(float_key_artifact).recall_text(["red shoes"], 5)
    with TestClient(create_app(float_key_artifact), client=LOOPBACK) as client:
        answer = client.post("/recall", json={"text": "red shoes", "k": 5})
        batch = client.post("/recall/batch", json={"queries": [{"text": "red shoes", "k": 5}]})
    assert answer.status_code == 200 and batch.status_code == 200
    assert answer.json()["items"] == expected.items == batch.json()["results"][0]["items"]
    assert all(isinstance(item, float) for item in expected.items)


def test_batch_equals_one_request_per_query(client, demo_artifact):
    _, oracle = demo_artifact
    queries = [
        {"user_id": oracle.query_ids[1], "k": 5},
        {"features": {"segment": "a", "age": 20}, "k": 2},
        {"user_id": "nobody"},
        {"user_id": oracle.query_ids[2], "k": 7, "exclude_seen": False},
        {"text": "anything"},
    ]
    answer = client.post("/recall/batch", json={"queries": queries})
    assert answer.status_code == 200
    results = answer.json()["results"]
    for query, result in zip(queries, results, strict=True):
        single = client.post("/recall", json=query)
        assert result["status"] == single.status_code
        if single.status_code == 200:
            alone = single.json()
            assert result["query"] == alone["query"] and result["items"] == alone["items"]
            # the same dot products, summed in another order within a larger matrix product
            assert result["scores"] == pytest.approx(alone["scores"], rel=1e-5, abs=1e-6)
            assert result["error"] is None
        else:
            assert result["error"] == single.json()["detail"] and result["items"] == []
    assert [r["status"] for r in results] == [200, 200, 404, 200, 422]


def test_similar_items_equals_the_library(client, retriever, demo_artifact):
    _, oracle = demo_artifact
    item = oracle.item_ids[11]
    answer = client.get(f"/items/{item}/similar", params={"k": 4}).json()
    assert answer["items"] == retriever.similar_items(item, 4).items
    assert answer["query"] == item and item not in answer["items"]


BAD_BODIES = [
    (b'{"user_id": 1,', "not valid JSON"),
    (b"[1, 2]", "Input should be a valid dictionary"),
    (b'"text"', "Input should be a valid dictionary"),
    (b"", "needs a JSON body"),
    (b'{"user_id": 1, "kk": 5}', "unknown field 'kk'"),
    (b'{"user_id": 1, "k": 0}', "k: Input should be greater than or equal to 1"),
    (b'{"user_id": 1, "k": 1001}', "k: Input should be less than or equal to 1000"),
    (b'{"user_id": 1, "k": "10"}', "k: Input should be a valid integer"),
    (b'{"user_id": 1, "k": 2.5}', "k: Input should be a valid integer"),
    (b'{"user_id": 1, "exclude_seen": 1}', "exclude_seen: Input should be a valid boolean"),
    (b'{"user_id": 1.5}', "user_id"),
    (b'{"user_id": [1]}', "user_id"),
    (b'{"user_id": 1, "exclude_items": 5}', "exclude_items: Input should be a valid list"),
    (b'{"features": {"age": {"x": 1}}}', "features.age"),
    (b'{"features": [1]}', "features: Input should be a valid dictionary"),
    (b'{"k": 5}', "give one of user_id, features, text or history (features may go with"),
    (b'{"user_id": 1, "text": "a"}', "got user_id and text"),
    (b'{"text": 5}', "text: Input should be a valid string"),
    (b'{"text": "\\ud800"}', "text: Input should be a valid string"),  # a lone surrogate
    (b'{"user_id": 1}{"user_id": 2}', "not valid JSON (Extra data)"),
    (b"\xff\xfe", "not valid JSON"),
]


@pytest.mark.parametrize(("body", "message"), BAD_BODIES)
def test_malformed_requests_get_a_422_naming_the_problem(client, body, message):
    response = client.post("/recall", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"user_id": 10**30}, 404, "unknown query id"),
        ({"user_id": "ghost"}, 404, "unknown query id(s): 'ghost'; recall a new user by its"),
        ({"features": {"age": 3, "height": 1, "zodiac": "leo"}}, 422, "'height', 'zodiac'"),
        ({"features": {"age": "old"}}, 422, "feature 'age': 'old' is not a valid double"),
        ({"features": {"user_id": 2.5}}, 422, "feature 'user_id': 2.5 is not a valid int64"),
        ({"text": "red shoes"}, 422, "query side has no text feature"),
        ({"features": {"segment": "\ud800"}}, 422, "feature 'segment': '\\ud800' is not a valid"),
        ({"features": {"sessions": [1, 2]}}, 422, "feature 'sessions': [1, 2] is not a valid"),
        ({"user_id": "\ud800"}, 404, "unknown query id(s): '\\ud800'"),
    ],
)
def test_requests_the_artifact_cannot_answer_get_a_4xx(client, body, status, message):
    raw = json.dumps(body).encode()  # escapes lone surrogates, which JSON may carry
    response = client.post("/recall", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert message in response.json()["detail"]


def test_bounds_on_batches_similar_and_routes(client):
    assert client.post("/recall/batch", json={"queries": []}).status_code == 422
    too_many = {"queries": [{"user_id": 1}] * (MAX_BATCH + 1)}
    assert client.post("/recall/batch", json=too_many).status_code in (413, 422)
    assert client.get("/items/1/similar", params={"k": 0}).status_code == 422
    assert client.get("/items/1/similar", params={"k": MAX_K + 1}).status_code == 422
    assert client.get("/items/1/similar", params={"k": "many"}).status_code == 422
    missing = client.get("/items/no-such-item/similar")
    assert missing.status_code == 404 and "unknown item id(s): 'no-such-item'" in missing.text
    assert client.get("/recall").status_code == 405
    assert client.post("/nowhere", json={}).status_code == 404


def test_oversized_bodies_get_a_413_declared_or_not(client):
    big = b'{"text": "' + b"a" * 5000 + b'"}'
    declared = client.post("/recall", content=big, headers={"content-type": "application/json"})
    assert (
        declared.status_code == 413 and "over the limit of 4096 bytes" in declared.json()["detail"]
    )

    def chunks():
        yield big[:3000]
        yield big[3000:]

    streamed = client.post(
        "/recall", content=chunks(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413
    assert client.post("/recall", json={"user_id": 1}).status_code in (200, 404)  # still serving


def test_health_ready_and_metrics(client, retriever):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and ready["items"] == retriever.num_items
    assert ready["artifact"] == retriever.artifact.fingerprint and ready["index"] == "exact"

    def count(text: str, route: str, status: str) -> float:
        labels = re.escape(f'method="POST",route="{route}",status="{status}"')
        pattern = rf"twotower_http_requests_total{{{labels}}} (\S+)"
        found = re.search(pattern, text)
        return float(found.group(1)) if found else 0.0

    before = client.get("/metrics").text
    client.post("/recall", json={"user_id": "ghost"})
    client.post("/recall", json={"user_id": "ghost", "k": -1})
    after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    assert count(after.text, "/recall", "404") == count(before, "/recall", "404") + 1
    assert count(after.text, "/recall", "422") == count(before, "/recall", "422") + 1
    assert "twotower_http_request_duration_seconds_bucket" in after.text
    assert "twotower_batch_queries_bucket" in after.text
    assert f'twotower_artifact_info{{fingerprint="{retriever.artifact.fingerprint}"' in after.text


def test_openapi_documents_every_field(client):
    schema = client.get("/openapi.json").json()
    assert {"/recall", "/recall/batch", "/items/{item_id}/similar", "/admin/reload"} <= set(
        schema["paths"]
    )
    ours = ["RecallRequest", "BatchRequest", "RecallResponse", "BatchResponse", "ReadyResponse"]
    for name in ours:
        properties = schema["components"]["schemas"][name]["properties"]
        undocumented = [field for field, spec in properties.items() if "description" not in spec]
        assert not undocumented, f"{name}: {undocumented}"
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            assert operation.get("description") or operation.get("summary"), (path, method)
            for parameter in operation.get("parameters", []):
                assert parameter.get("description"), (path, method, parameter["name"])


def test_admin_reload_needs_the_token_when_one_is_set(demo_artifact):
    app = create_app(demo_artifact[0], ServiceConfig(admin_token="s3cret-token-of-16+"))
    with TestClient(app, client=LOOPBACK) as client:
        assert client.post("/admin/reload").status_code == 401
        wrong = client.post("/admin/reload", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403
        right = client.post(
            "/admin/reload", headers={"Authorization": "Bearer s3cret-token-of-16+"}
        )
        assert right.status_code == 200 and right.json()["artifact"] == right.json()["previous"]


def test_admin_reload_without_a_token_answers_loopback_only(demo_artifact):
    app = create_app(demo_artifact[0])
    with TestClient(app, client=("10.1.2.3", 4000)) as remote:
        assert remote.post("/admin/reload").status_code == 403
    with TestClient(app, client=("::1", 4000)) as local:
        assert local.post("/admin/reload").status_code == 200


def test_a_failed_reload_keeps_the_old_artifact_serving(demo_artifact, tmp_path):
    import shutil

    folder = tmp_path / "artifact"
    shutil.copytree(demo_artifact[0], folder)
    with TestClient(create_app(folder), client=LOOPBACK) as client:
        user = demo_artifact[1].query_ids[0]
        before = client.post("/recall", json={"user_id": user}).json()
        vectors = folder / "item_vectors.npy"
        vectors.write_bytes(vectors.read_bytes()[:-4] + b"\0\0\0\0")
        failed = client.post("/admin/reload")
        assert failed.status_code == 409
        assert "item_vectors.npy: corrupt" in failed.json()["detail"]
        assert f"still serving {before['artifact']}" in failed.json()["detail"]
        assert client.post("/recall", json={"user_id": user}).json() == before
        assert 'twotower_reloads_total{result="failed"} 1.0' in client.get("/metrics").text


def test_results_are_what_the_dataclass_holds(client, retriever, demo_artifact):
    _, oracle = demo_artifact
    (result,) = retriever.recall_users(oracle.query_ids[:1], 3)
    body = client.post("/recall", json={"user_id": oracle.query_ids[0], "k": 3}).json()
    assert {k: body[k] for k in dataclasses.asdict(result)} == dataclasses.asdict(result)


def test_a_multi_interest_artifact_answers_as_the_library_does(interests_artifact):
    """Users, feature rows, batches and similar items over HTTP equal the retriever's
    answers, the interest that found each item included."""
    folder, oracle = interests_artifact
    retriever = Retriever.load(folder)
    served = answered_by(retriever.artifact)
    users = [oracle.query_ids[r] for r in (0, 5, 11)]
    with TestClient(create_app(folder), client=LOOPBACK) as client:
        for user in users:
            answer = client.post("/recall", json={"user_id": user, "k": 12}).json()
            (expected,) = retriever.recall_users([user], 12)
            assert answer == {**served, **_items(expected)}
            assert len(answer["interests"]) == 12
        batch = client.post("/recall/batch", json={"queries": [{"user_id": u} for u in users]})
        expected = retriever.recall_users(users, 10)
        assert [
            {k: e[k] for k in ("query", "items", "scores", "interests", "vector", "state")}
            for e in batch.json()["results"]
        ] == [_items(e) for e in expected]
        row = retriever.artifact.queries.slice(2, 1).to_pylist()[0]
        answer = client.post("/recall", json={"features": row, "k": 5}).json()
        (expected,) = retriever.recall_rows(retriever.artifact.queries.slice(2, 1), 5)
        assert {k: answer[k] for k in ("items", "scores", "interests", "vector", "state")} == {
            k: v for k, v in _items(expected).items() if k != "query"
        }
        item = oracle.item_ids[3]
        answer = client.get(f"/items/{item}/similar", params={"k": 4}).json()
        assert answer["interests"] is None
        assert answer["items"] == retriever.similar_items(item, 4).items


def test_every_recall_answer_is_its_schema_exactly(client, text_client, demo_artifact):
    """/recall and /items/{id}/similar write their JSON directly: it must be what the
    documented RecallResponse model would have written."""
    from twotower.serving.schemas import RecallResponse

    user = demo_artifact[1].query_ids[3]
    item = demo_artifact[1].item_ids[5]
    answers = [
        client.post("/recall", json={"user_id": user, "k": 5}),
        client.post("/recall", json={"features": {"segment": "a", "age": 20}, "k": 5}),
        client.get(f"/items/{item}/similar?k=5"),
        text_client.post("/recall", json={"text": "red shoes", "k": 3}),
    ]
    for response in answers:
        assert response.status_code == 200, response.text
        body = response.json()
        assert list(body) == list(RecallResponse.model_fields)
        assert RecallResponse.model_validate(body).model_dump(mode="json") == body
