"""The running service, fuzzed from its own OpenAPI schema (schemathesis): no request
gets a 5xx, every answer matches the schema's documented responses, and the service
is still up and answering correctly afterwards. Requests carry the admin token, so
the events, reloads and item changes they make are taken, not only refused. The
service runs twice: its users' states in its memory, then in Redis (a real server,
loaded from the artifact).

Bounded for CI: a fixed number of generated requests, no deadline.
"""

from __future__ import annotations

import collections
import shutil

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from twotower.serving import Retriever
from twotower.serving.artifact import Artifact
from twotower.serving.http import ServiceConfig, create_app
from twotower.serving.query import Query
from twotower.serving.stores.redis_store import RedisStore

EXAMPLES = {"memory": 24, "redis": 12}  # per operation and mode
# operations with a body or a bounded value: broken input gets a 4xx from each
WITH_INPUT = {
    "POST /recall",
    "POST /recall/batch",
    "GET /items/{item_id}/similar",
    "POST /explorer/items",
    "POST /admin/items",
}
TOKEN = "fuzzing-admin-token-0123456789"
AUTHORIZED = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module", params=["memory", "redis"])
def service(request, demo_artifact, live_service, tmp_path_factory):
    """The service's URL, its users' states in its memory or in Redis."""
    folder = tmp_path_factory.mktemp("fuzz") / "artifact"
    shutil.copytree(demo_artifact[0], folder)
    state = None
    if request.param == "redis":
        state = request.getfixturevalue("shared_redis").url
        store = RedisStore(state)
        store.load_artifact(Artifact.load(folder))
        store.close()
    config = ServiceConfig(admin_token=TOKEN, max_body_bytes=64 * 1024, state=state)
    with live_service(create_app(folder, config)) as url:
        yield url, request.param, folder


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_server_error(service, mode):
    """Valid requests (positive) and requests that break the schema (negative), spread
    over every operation the schema lists, admin ones included."""
    service, store, _ = service
    schema = schemathesis.openapi.from_url(f"{service}/openapi.json")
    operations = [operation.ok() for operation in schema.get_all_operations()]
    answered: collections.Counter = collections.Counter()

    def request(case):
        response = case.call(base_url=service, timeout=30, headers=AUTHORIZED)
        answered[
            case.operation.method.upper(), case.operation.path, response.status_code // 100
        ] += 1
        case.validate_response(response, checks=[not_a_server_error])

    for operation in operations:  # each its own examples: none is left to chance
        fuzz = given(case=operation.as_strategy(generation_mode=mode))(request)
        fuzz = settings(
            max_examples=EXAMPLES[store],
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )(fuzz)
        try:
            fuzz()
        except Unsatisfiable:  # negative: an operation with no input to break
            assert mode == GenerationMode.NEGATIVE, operation.path
    operations = {f"{operation.method.upper()} {operation.path}" for operation in operations}
    reached = {f"{method} {path}" for method, path, _ in answered}
    if mode == GenerationMode.POSITIVE:  # every operation, answered as well as refused
        assert reached == operations, answered
        assert {2, 4} <= {status for _, _, status in answered}, answered
        assert answered["POST", "/events", 2], answered  # taken, by either store
    else:  # every operation that takes a body or a bounded value, refused with a 4xx
        refused = {f"{method} {path}" for method, path, status in answered if status == 4}
        assert refused >= WITH_INPUT, answered


def test_the_service_answers_correctly_after_the_fuzzing(service, retriever, demo_artifact):
    """Runs after the fuzz test (file order): the service is up and still right. The
    fuzzed events may have changed any user's stored state, so the query carries the
    whole state itself (which wins over the stored one) and keeps seen items; the
    fuzzed item changes may have changed the catalogue, so the answer expected is the
    library's over the folder's latest version."""
    service, _, folder = service
    user = demo_artifact[1].query_ids[3]
    (stored,) = retriever.store.read([user]).recent
    state = {
        "features": retriever.artifact.queries.slice(3, 1).to_pylist()[0],
        "history": [item for item, _ in reversed(stored)],
        "history_times": [time for _, time in reversed(stored)],
        "exclude_seen": False,
        "k": 10,
    }
    latest = Retriever.load(folder)
    (expected,) = latest.retrieve([Query(user=user, **state)])
    query = {"user_id": user, **state}
    with httpx.Client(base_url=service, timeout=30) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/ready").status_code == 200
        body = http.post("/recall", json=query).json()
    assert body["items"] == expected.items
    assert body["version"] == latest.artifact.version
