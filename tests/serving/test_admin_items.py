"""POST /admin/items: items added, replaced, blocked, unblocked and removed in a running
service, each change written as the artifact's next version, then served; the
version every answer names; and what a bad change or a missing token gets."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from twotower.config import apply_overrides
from twotower.export import export_run
from twotower.serving import Artifact, Retriever
from twotower.serving.http import ServiceConfig, create_app
from twotower.serving.item_changes import ItemChange, prepare_update
from twotower.serving.updates import apply_update
from twotower.training.run import train_run

LOOPBACK = ("127.0.0.1", 50000)
TOKEN = "items-admin-token-0123456789"
AUTHORIZED = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def search_run(tmp_path_factory, tiny_text) -> Path:
    """A search run (query text against item titles) trained long enough that a title's
    words place an item: "red shoes" finds the items titled "red shoes <n>" first."""
    folder = Path(tmp_path_factory.mktemp("search"))
    config = apply_overrides(
        tiny_text(folder / "data"), ["training.epochs=20", "training.patience=0"]
    )
    train_run(config, folder / "run")
    return folder / "run"


def _copy(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "artifact"))


def _row(artifact: Artifact, item, **values) -> dict:
    """Item ``item``'s raw row, with ``values`` replaced."""
    (row,) = artifact.item_rows([item])
    return {**artifact.items.slice(int(row), 1).to_pylist()[0], **values}


def _change(client: TestClient, body: dict) -> dict:
    answer = client.post("/admin/items", json=body, headers=AUTHORIZED)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _service(folder: Path, **settings) -> TestClient:
    config = ServiceConfig(admin_token=TOKEN, **settings)
    return TestClient(create_app(folder, config), client=LOOPBACK)


def test_an_item_added_over_http_is_returned_for_text_that_matches_it(search_run, tmp_path):
    export_run(search_run, tmp_path / "export")
    folder = _copy(tmp_path / "export", tmp_path)
    query = {"text": "red shoes", "k": 5}
    with _service(folder) as client:
        before = client.post("/recall", json=query).json()
        assert 1000 not in before["items"]
        answer = _change(client, {"upsert": [{"i": 1000, "title": "red shoes 9"}]})
        assert (answer["version"], answer["added"], answer["replaced"]) == (2, 1, 0)
        after = client.post("/recall", json=query).json()
        other = client.post("/recall", json={"text": "blue hat", "k": 5}).json()
    assert 1000 in after["items"] and 1000 not in other["items"]
    assert after["version"] == before["version"] + 1 == 2
    assert after["artifact"] == answer["artifact"] != before["artifact"]
    # served in place, equal to the folder loaded whole (what a restarted service serves)
    (expected,) = Retriever.load(folder).recall_text(["red shoes"], 5)
    assert after["items"] == expected.items
    assert after["scores"] == pytest.approx(expected.scores, abs=1e-6)
    assert Artifact.load(folder).fingerprint == answer["artifact"]


def test_an_item_added_over_http_is_returned_to_a_user_whose_taste_it_fits(demo_artifact, tmp_path):
    """A new id with the features of the item a user likes best: its id feature reads
    the out-of-vocabulary row, its other features place it where that user looks."""
    folder = _copy(demo_artifact[0], tmp_path)
    user = demo_artifact[1].query_ids[0]
    artifact = Artifact.load(folder)
    with _service(folder) as client:
        (liked, *_) = client.post("/recall", json={"user_id": user, "k": 10}).json()["items"]
        _change(client, {"upsert": [_row(artifact, liked, item_id=900_001)]})
        after = client.post("/recall", json={"user_id": user, "k": 10}).json()
    assert 900_001 in after["items"]
    (expected,) = Retriever.load(folder).recall_users([user], 10)
    assert after["items"] == expected.items


@pytest.mark.parametrize("kind", ["exact", "flat", "hnsw", "ivfpq"])
def test_a_blocked_item_is_never_returned(demo_artifact, tmp_path, kind):
    """Blocked after rows were added and replaced (so the index grew in place): no
    answer holds a blocked item, even asking for the whole corpus; unblocked, it is
    back; a replaced item is returned once (its old vector never)."""
    export_run(demo_artifact[1].run_dir, tmp_path / "export", index=kind)
    folder = _copy(tmp_path / "export", tmp_path)
    artifact = Artifact.load(folder)
    users = demo_artifact[1].query_ids[:20]
    everything = {"queries": [{"user_id": u, "k": 1000} for u in users]}
    with _service(folder) as client:
        tops = client.post("/recall/batch", json={"queries": [{"user_id": u} for u in users]})
        top = sorted({i for r in tops.json()["results"] for i in r["items"][:3]})
        upsert = [_row(artifact, top[0], item_id=900_002), _row(artifact, top[1], price=1.5)]
        _change(client, {"upsert": upsert})
        blocked = [*top, 900_002]
        _change(client, {"block": blocked})
        answers = client.post("/recall/batch", json=everything).json()["results"]
        similar = [client.get(f"/items/{i}/similar?k=1000").json() for i in (top[0], top[-1], 7)]
        returned = [set(r["items"]) for r in [*answers, *similar]]
        assert all(not (items & set(blocked)) for items in returned)
        assert all(len(r["items"]) == len(set(r["items"])) for r in [*answers, *similar])
        assert similar[0]["query"] == top[0]  # a blocked item is still known
        _change(client, {"unblock": blocked})
        back = client.post("/recall/batch", json=everything).json()["results"]
    assert set(blocked) <= set().union(*(r["items"] for r in back))


def test_a_removed_item_is_unknown_and_an_added_one_takes_events(demo_artifact, tmp_path):
    folder = _copy(demo_artifact[0], tmp_path)
    artifact = Artifact.load(folder)
    removed, copied = demo_artifact[1].item_ids[5], demo_artifact[1].item_ids[6]
    user = demo_artifact[1].query_ids[2]
    event = {"events": [{"user": user, "item": 900_003, "timestamp": 2e9}]}
    with _service(folder) as client:
        refused = client.post("/events", json=event, headers=AUTHORIZED).json()
        assert refused["stored"] == 0 and "900003" in refused["refused"][0]["error"]
        _change(client, {"upsert": [_row(artifact, copied, item_id=900_003)], "remove": [removed]})
        taken = client.post("/events", json=event, headers=AUTHORIZED).json()
        assert taken["stored"] == 1 and taken["version"] == 2
        assert client.get(f"/items/{removed}/similar").status_code == 404
        answer = client.post("/recall", json={"user_id": user, "k": 1000}).json()
        assert removed not in answer["items"] and 900_003 not in answer["items"]  # seen now
        again = client.post("/admin/items", json={"block": [removed]}, headers=AUTHORIZED)
    assert again.status_code == 422 and str(removed) in again.json()["detail"]


def test_every_answer_names_the_version_it_came_from(demo_artifact, tmp_path):
    folder = _copy(demo_artifact[0], tmp_path)
    user, item = demo_artifact[1].query_ids[1], demo_artifact[1].item_ids[3]
    with _service(folder) as client:

        def versions() -> dict[str, int]:
            answers = {
                "recall": client.post("/recall", json={"user_id": user}),
                "batch": client.post("/recall/batch", json={"queries": [{"user_id": user}]}),
                "similar": client.get(f"/items/{item}/similar"),
                "ready": client.get("/ready"),
                "info": client.get("/explorer/info"),
                "items": client.post("/explorer/items", json={"ids": [item]}),
                "map": client.get("/explorer/map?limit=5"),
                "user": client.get(f"/explorer/queries/{user}"),
                "suggest": client.get("/explorer/queries?prefix=1"),
            }
            return {name: answer.json()["version"] for name, answer in answers.items()}

        assert set(versions().values()) == {1}
        for version in (2, 3):
            answer = _change(client, {"block": [item]} if version == 2 else {"unblock": [item]})
            assert answer["version"] == version
            assert set(versions().values()) == {version}
        reload = client.post("/admin/reload", headers=AUTHORIZED).json()
        metrics = client.get("/metrics").text
    assert reload["version"] == 3 and reload["artifact"] == reload["previous"]
    assert "twotower_artifact_version 3.0" in metrics
    assert 'twotower_item_changes_total{kind="blocked"} 1.0' in metrics


def test_a_change_that_changes_nothing_writes_no_version(demo_artifact, tmp_path):
    folder = _copy(demo_artifact[0], tmp_path)
    artifact = Artifact.load(folder)
    item = demo_artifact[1].item_ids[0]
    with _service(folder) as client:
        answer = _change(client, {"upsert": [_row(artifact, item)], "unblock": [item]})
    assert answer["version"] == 1 and answer["artifact"] == artifact.fingerprint
    assert sum(answer[kind] for kind in ("added", "replaced", "unblocked")) == 0
    assert Artifact.load(folder).version == 1


def test_a_version_another_writer_added_is_served_before_the_change(demo_artifact, tmp_path):
    """``twotower export --update`` wrote version 2 beside the running service: a
    change over HTTP brings the service to it first, then writes version 3 on top."""
    folder = _copy(demo_artifact[0], tmp_path)
    first, second = demo_artifact[1].item_ids[:2]
    with _service(folder) as client:
        offline = Artifact.load(folder)
        apply_update(offline, prepare_update(offline, ItemChange(block=[first])))
        answer = _change(client, {"block": [second]})
        ready = client.get("/ready").json()
        similar = client.get(f"/items/{second}/similar?k=1000").json()
    assert answer["version"] == 3 and ready["version"] == 3 and similar["version"] == 3
    assert first not in similar["items"]  # the other writer's block is served
    assert Artifact.load(folder).catalogue.blocked.sum() == 2


BAD_CHANGES = [
    ({}, 422, "give at least one item to upsert, block, unblock or remove"),
    ({"upsert": []}, 422, "give at least one item"),
    ({"block": [1], "colour": 2}, 422, "unknown field 'colour'"),
    ({"block": 5}, 422, "block: Input should be a valid list"),
    ({"block": [1.5]}, 422, "block.0"),
    ({"upsert": [[1, 2]]}, 422, "upsert.0: Input should be a valid dictionary"),
    ({"upsert": [{"item_id": 900_010}]}, 422, "upsert, row 0: lacks column(s) 'category'"),
    ({"upsert": [{"item_id": 1, "size": 3}]}, 422, "column(s) 'size' are not the item table's"),
    ({"block": [10**9, "ghost"]}, 422, "cannot block item(s) the artifact does not know"),
    ({"remove": ["ghost"]}, 422, "cannot remove item(s) the artifact never held: 'ghost'"),
    ({"block": [3], "unblock": ["3"]}, 422, "items asked both to block and to unblock: 3"),
    ({"block": list(range(10_001))}, 422, "block: List should have at most 10000 items"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_CHANGES)
def test_a_bad_change_gets_a_4xx_naming_what_is_wrong(
    demo_artifact, tmp_path, body, status, message
):
    folder = _copy(demo_artifact[0], tmp_path)
    with _service(folder, max_body_bytes=1 << 20) as client:
        answer = client.post("/admin/items", json=body, headers=AUTHORIZED)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["detail"]
    assert Artifact.load(folder).version == 1  # nothing written


def test_a_bad_value_is_named_by_its_row_and_column(demo_artifact, tmp_path):
    folder = _copy(demo_artifact[0], tmp_path)
    artifact = Artifact.load(folder)
    rows = [_row(artifact, 1, item_id=900_011), _row(artifact, 2, item_id=900_012, price="cheap")]
    with _service(folder) as client:
        answer = client.post("/admin/items", json={"upsert": rows}, headers=AUTHORIZED)
    assert answer.status_code == 422
    assert "upsert, row 1: feature 'price': 'cheap' is not a valid double" in answer.text


def test_changes_need_the_admin_token(demo_artifact, tmp_path):
    folder = _copy(demo_artifact[0], tmp_path)
    body = {"block": [demo_artifact[1].item_ids[0]]}
    with _service(folder) as client:
        assert client.post("/admin/items", json=body).status_code == 401
        wrong = {"Authorization": "Bearer not-the-token-at-all"}
        assert client.post("/admin/items", json=body, headers=wrong).status_code == 403
        ingest = ServiceConfig(admin_token=TOKEN, ingest_token="ingest-token-0123456789")
    with TestClient(create_app(folder, ingest), client=LOOPBACK) as client:
        headers = {"Authorization": "Bearer ingest-token-0123456789"}
        assert client.post("/admin/items", json=body, headers=headers).status_code == 403
    with TestClient(create_app(folder), client=("10.1.2.3", 4000)) as remote:
        assert remote.post("/admin/items", json=body).status_code == 403
    assert Artifact.load(folder).version == 1
    with TestClient(create_app(folder), client=LOOPBACK) as local:
        assert local.post("/admin/items", json=body).status_code == 200


def test_requests_during_changes_see_one_version_whole(demo_artifact, tmp_path, live_service):
    """Clients keep asking while items are blocked and unblocked: each answer is its
    version's answer exactly (never a mix of two versions), none fails."""
    folder = _copy(demo_artifact[0], tmp_path)
    user = demo_artifact[1].query_ids[4]
    query = {"user_id": user, "k": 10}
    with live_service(create_app(folder)) as url, httpx.Client(base_url=url, timeout=60) as admin:
        (top, second, *_) = admin.post("/recall", json=query).json()["items"]
        expected = {1: admin.post("/recall", json=query).json()["items"]}
        answers, stop = [], threading.Event()

        def ask() -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                while not stop.is_set():
                    response = http.post("/recall", json=query)
                    answers.append((response.status_code, response.json()))

        clients = [threading.Thread(target=ask) for _ in range(4)]
        for client in clients:
            client.start()
        try:
            for version in range(2, 8):
                body = {"block": [top, second]} if version % 2 == 0 else {"unblock": [top, second]}
                assert admin.post("/admin/items", json=body).json()["version"] == version
                expected[version] = admin.post("/recall", json=query).json()["items"]
        finally:
            stop.set()
            for client in clients:
                client.join()
    assert expected[2] != expected[1] == expected[3]
    assert {status for status, _ in answers} == {200}
    for _, answer in answers:
        assert answer["items"] == expected[answer["version"]], answer["version"]


def test_ready_counts_the_items_the_version_holds(demo_artifact, tmp_path):
    """Added items count, removed ones do not, blocked and replaced ones once."""
    folder = _copy(demo_artifact[0], tmp_path)
    artifact = Artifact.load(folder)
    first, second, third = demo_artifact[1].item_ids[:3]
    upsert = [_row(artifact, first, item_id=900_020), _row(artifact, second, price=0.5)]
    with _service(folder) as client:
        before = client.get("/ready").json()["items"]
        _change(client, {"upsert": upsert, "block": [first], "remove": [third]})
        after = client.get("/ready").json()["items"]
        info = client.get("/explorer/info").json()["items"]
    assert before == artifact.items.num_rows and after == before == info
