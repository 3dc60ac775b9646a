"""The lean ``/recall`` path: its codec takes only what the pydantic model takes, as the
same query, and its answers are the framework route's, byte for byte in meaning."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from twotower.serving.http import ServiceConfig, create_app
from twotower.serving.query import Result
from twotower.serving.recall_codec import decode, encode, encode_answer
from twotower.serving.schemas import RecallRequest, RecallResponse

LOOPBACK = ("127.0.0.1", 50000)
# a JSON content type the lean path leaves to the framework, which reads it as JSON
FRAMEWORK = {"content-type": "application/vnd.twotower+json"}
LEAN = {"content-type": "application/json"}

VALID = [
    {"user_id": 17},
    {"user_id": "17", "k": 3, "exclude_seen": False},
    {"user_id": 17, "features": {"age": 31, "segment": "b"}},
    {"features": {"age": 31.5, "segment": None, "tags": [1, "x", 2.5, True, None]}},
    {"history": [50, "181", 172], "history_times": [884e6, 885, 886.5]},
    {"text": "red running shoes", "k": 1000, "exclude_items": [12, "40"]},
    {"user_id": 1, "filter": {"category": {"in": ["c1", 3, 2.5, False]}, "price": {"lt": 20}}},
    {"user_id": 1, "filter": {"price": {"gte": 1.5, "lte": 3, "gt": None, "not_in": [4]}}},
    {"user_id": 10**30, "exclude_items": []},
    {"text": "caf\u00e9 \U0001f600", "history": []},
]


def _oracle(body: bytes):
    """The query the framework's path makes of ``body``, or None where it refuses it."""
    try:
        return RecallRequest.model_validate(json.loads(body)).query()
    except (ValueError, ValidationError):
        return None


@pytest.mark.parametrize("request_body", VALID)
def test_a_valid_body_decodes_to_the_models_query(request_body):
    body = json.dumps(request_body, ensure_ascii=False).encode()
    assert decode(body) is not None
    assert decode(body) == _oracle(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"user_id": 1,',
        b"[1, 2]",
        b"",
        b'{"user_id": 1, "kk": 5}',
        b'{"user_id": 1, "k": 0}',
        b'{"user_id": 1, "k": 1001}',
        b'{"user_id": 1, "k": "10"}',
        b'{"user_id": 1, "k": true}',
        b'{"user_id": 1, "exclude_seen": 1}',
        b'{"user_id": 1.5}',
        b'{"user_id": true}',
        b'{"features": {"age": {"x": 1}}}',
        b'{"k": 5}',
        b'{"user_id": 1, "text": "a"}',
        b'{"text": "\\ud800"}',
        b'{"user_id": 1}{"user_id": 2}',
        b'{"user_id": 1, "history_times": [NaN]}',
        b'{"user_id": 1, "filter": {"price": {"lt": "cheap"}}}',
        b'{"user_id": 1, "filter": {"price": {"near": 2}}}',
        b"\xef\xbb\xbf" + b'{"user_id": 1}',
        b"\xff\xfe",
    ],
)
def test_a_body_the_model_refuses_is_left_to_the_framework(body):
    assert decode(body) is None


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
FIELDS = ["user_id", "features", "history", "history_times", "text", "k", "exclude_seen"]
FIELDS += ["exclude_items", "filter", "kk"]
CONDITION = st.dictionaries(
    st.sampled_from(["in", "not_in", "gt", "lte", "x"]), JSON_VALUES, max_size=2
)
BODIES = st.dictionaries(
    st.sampled_from(FIELDS),
    JSON_VALUES | st.dictionaries(st.sampled_from(["age", "price"]), CONDITION, max_size=2),
    max_size=4,
)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(request_body=BODIES)
def test_whatever_the_codec_takes_the_model_takes_as_the_same_query(request_body):
    body = json.dumps(request_body).encode()
    lean = decode(body)
    if lean is not None:
        assert lean == _oracle(body)


@pytest.fixture(scope="module")
def client(demo_artifact):
    app = create_app(demo_artifact[0], ServiceConfig(max_body_bytes=4096))
    with TestClient(app, client=LOOPBACK) as client:
        yield client


def test_the_lean_answers_are_the_framework_routes(client, demo_artifact):
    oracle = demo_artifact[1]
    bodies = [
        {"user_id": oracle.query_ids[2], "k": 5},
        {"user_id": str(oracle.query_ids[3]), "exclude_items": [oracle.item_ids[0]]},
        {"features": {"segment": "a", "age": 20}, "k": 4},
        {"history": [oracle.item_ids[1], oracle.item_ids[2]], "k": 3},
        {"user_id": "ghost"},
        {"features": {"age": "old"}},
        {"features": {"height": 1}},
        {"features": {"segment": "caf\u00e9"}, "k": 2},
    ]
    for body in bodies:
        raw = json.dumps(body).encode()
        lean = client.post("/recall", content=raw, headers=LEAN)
        framework = client.post("/recall", content=raw, headers=FRAMEWORK)
        assert lean.status_code == framework.status_code, (body, lean.text, framework.text)
        assert lean.json() == framework.json()
        assert lean.headers["content-type"] == framework.headers["content-type"]
        assert lean.content.isascii()
        if lean.status_code == 200:
            assert list(lean.json()) == list(RecallResponse.model_fields)


def test_lean_answers_are_counted_under_the_recall_route(client, demo_artifact):
    def count(text: str, status: str) -> float:
        labels = re.escape(f'method="POST",route="/recall",status="{status}"')
        found = re.search(rf"twotower_http_requests_total{{{labels}}} (\S+)", text)
        return float(found.group(1)) if found else 0.0

    before = client.get("/metrics").text
    client.post("/recall", json={"user_id": demo_artifact[1].query_ids[0]})
    client.post("/recall", json={"user_id": "ghost"})
    after = client.get("/metrics").text
    assert count(after, "200") == count(before, "200") + 1
    assert count(after, "404") == count(before, "404") + 1


def test_answers_are_the_models_json_in_ascii():
    result = Result("caf\u00e9", [1, "b", 2.5], [0.5, 1e-05], None, "tower", None)
    body = encode_answer(result, "abc", 3)
    expected = RecallResponse(artifact="abc", version=3, **result.__dict__).model_dump(mode="json")
    assert body.isascii() and json.loads(body) == expected
    assert encode({"detail": "\ud800"}) == b'{"detail":"\\ud800"}'  # a lone surrogate echoed
