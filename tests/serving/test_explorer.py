"""The retrieval explorer: its lookups against the artifact, and the page in a real
browser (Debian's headless Chromium driven by Playwright) against the library.

The browser test skips where Chromium or Playwright is missing; ``.ci/run`` installs
both. ``TWOTOWER_SCREENSHOTS=DIR`` saves a screenshot of each view into DIR.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from fastapi.testclient import TestClient

from twotower.data.dataset import ITEM_ID, QUERY_ID
from twotower.serving import Artifact, Retriever, UnknownQueryError, explorer
from twotower.serving.http import create_app
from twotower.serving.query import Query
from twotower.serving.stores import MemoryStore
from twotower.sources import load_data
from twotower.training.run import load_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LOOPBACK = ("127.0.0.1", 50000)
K = 10


@pytest.fixture(scope="module")
def client(demo_artifact):
    with TestClient(create_app(demo_artifact[0]), client=LOOPBACK) as client:
        yield client


def test_query_record_holds_the_row_the_history_and_the_held_out_items(
    client, retriever, demo_artifact
):
    artifact = retriever.artifact
    user = artifact.queries.column(artifact.query_key)[5].as_py()
    record = client.get(f"/explorer/queries/{user}").json()
    assert record["features"] == artifact.queries.slice(5, 1).to_pylist()[0]
    history = [item["item_id"] for item in record["history"]]
    transform = artifact.pipeline.transforms["query"]["history"]
    codes = transform.transform(artifact.queries.column(artifact.query_key).slice(5, 1))[0]
    vocabulary = artifact.pipeline.transforms["item"]["item_id"].vocabulary.values
    assert history == [vocabulary[int(c) - 2].as_py() for c in codes if c >= 2]
    assert record["history_total"] == len(history) > 0
    seen = set(artifact.item_ids.take(artifact.seen[5].indices).to_pylist())
    assert set(history) <= seen
    heldout = _test_items(demo_artifact[1].run_dir, user)
    assert sorted(record["heldout"]) == sorted(set(heldout)) and heldout
    assert sorted(record["before_heldout"]) == sorted(seen - set(heldout))


def _record_of_state(retriever, user) -> dict:
    """The oracle for a record: the user's state as the store reads it, item ids only."""
    state = retriever.store.read([user])
    assert state.known[0]
    return {
        "features": state.features[0],
        "history": [item for item, _ in state.recent[0]],
        "history_total": len(state.recent[0]),
    }


def _record_ids(record: dict) -> dict:
    history = [item["item_id"] for item in record["history"]]
    return {"features": record["features"], "history": history, "history_total": len(history)}


def test_the_record_is_the_users_state_in_the_store(client, retriever):
    artifact = retriever.artifact
    users = artifact.queries.column(artifact.query_key).to_pylist()[:20]
    width = artifact.pipeline.recent_length
    for user in users:
        record = client.get(f"/explorer/queries/{user}").json()
        assert record["id"] == user
        assert _record_ids(record) == _record_of_state(retriever, user)
        assert f"the latest {width}" in record["history_kind"]


def test_the_record_after_an_event_shows_its_item_first(demo_artifact):
    folder, oracle = demo_artifact
    user_row = 9
    user = oracle.query_ids[user_row]
    item = oracle.item_ids[int(np.flatnonzero(~oracle.seen[user_row])[0])]  # never had it
    event = {"user": user, "item": item, "timestamp": 4e9}  # later than every logged one
    with TestClient(create_app(folder), client=LOOPBACK) as client:
        before = client.get(f"/explorer/queries/{user}").json()
        assert client.post("/events", json={"events": [event]}).json()["stored"] == 1
        after = client.get(f"/explorer/queries/{user}").json()
        served = client.app.state.service.retriever
        assert _record_ids(after) == _record_of_state(served, user)
        # a user the artifact does not know, started by events: its state, no split
        other = oracle.item_ids[3]
        events = [{"user": "newcomer", "item": item, "timestamp": 1.0}]
        events.append({"user": "newcomer", "item": other, "timestamp": 2.0})
        client.post("/events", json={"events": events})
        newcomer = client.get("/explorer/queries/newcomer").json()
    history = [entry["item_id"] for entry in after["history"]]
    width = served.artifact.pipeline.recent_length
    assert item not in [entry["item_id"] for entry in before["history"]]
    assert history[0] == item
    assert history[1:] == [entry["item_id"] for entry in before["history"]][: width - 1]
    assert item in after["before_heldout"] and item not in before["before_heldout"]
    assert after["heldout"] == before["heldout"] and after["features"] == before["features"]
    assert newcomer["id"] == "newcomer" and newcomer["features"] == {}
    assert [entry["item_id"] for entry in newcomer["history"]] == [other, item]
    assert newcomer["heldout"] == []


def test_a_typed_history_is_the_request_state(client, retriever):
    """The page's request shape: item ids as typed (text), oldest first, with or
    without the user id."""
    artifact = retriever.artifact
    user = artifact.queries.column(artifact.query_key)[3].as_py()
    typed = [str(i) for i in artifact.item_ids.to_pylist()[10:13]]
    alone = client.post("/recall", json={"k": K, "exclude_seen": True, "history": typed})
    assert alone.status_code == 200, alone.text
    assert alone.json()["state"] == {"features": "none", "history": "request"}
    (expected,) = retriever.retrieve([Query(history=[int(i) for i in typed], k=K)])
    assert alone.json()["items"] == expected.items
    body = {"user_id": user, "k": K, "exclude_seen": True, "history": typed}
    mine = client.post("/recall", json=body).json()
    assert mine["state"] == {"features": "stored", "history": "request"}
    (expected,) = retriever.retrieve([Query(user=user, history=[int(i) for i in typed], k=K)])
    assert mine["items"] == expected.items
    unknown = client.post("/recall", json={**body, "history": [typed[0], "nope"]})
    assert unknown.status_code == 404
    assert "unknown item id(s): 'nope'" in unknown.json()["detail"]


def test_the_record_needs_no_users_in_the_artifact(demo_artifact):
    """A service whose users live in an online store loads the artifact without them:
    the record comes from the store alone, with no held-out items; no suggestions."""
    folder, oracle = demo_artifact
    bare = Artifact.load(folder, users=False)
    store = MemoryStore(Artifact.load(folder))  # stands in for an online store
    user = oracle.query_ids[5]
    record = explorer.query_record(bare, store, str(user))
    assert _record_ids(record) == _record_of_state(Retriever(Artifact.load(folder)), user)
    assert record["id"] == str(user) and record["heldout"] == record["before_heldout"] == []
    with pytest.raises(UnknownQueryError):
        explorer.query_record(bare, store, "nobody")
    assert explorer.suggest(bare, "", 10) == [] and not explorer.info(bare)["users"]


def test_items_come_back_in_the_order_asked_and_unknown_ids_are_named(client, retriever):
    ids = retriever.artifact.item_ids.to_pylist()[:5][::-1]
    items = client.post("/explorer/items", json={"ids": ids}).json()["items"]
    assert [item["item_id"] for item in items] == ids
    assert {"title", "genres"} <= set(items[0])
    response = client.post("/explorer/items", json={"ids": [ids[0], "nope"]})
    assert response.status_code == 404 and "'nope'" in response.json()["detail"]


def test_the_map_is_the_first_two_principal_components(client, retriever):
    vectors = retriever.artifact.item_vectors.astype(np.float64)
    centered = vectors - vectors.mean(axis=0)
    _, _, components = np.linalg.svd(centered, full_matrices=False)  # the oracle: an SVD
    expected = centered @ components[:2].T
    expected /= np.abs(expected).max()
    ids = retriever.artifact.item_ids.to_pylist()
    points = np.array(client.post("/explorer/items", json={"ids": ids}).json()["points"])
    signs = np.sign((points * expected).sum(axis=0))  # each axis is defined up to its sign
    np.testing.assert_allclose(points, expected * signs, atol=2e-4)
    sample = client.get("/explorer/map", params={"limit": 10}).json()
    rows = retriever.artifact.item_rows(sample["ids"])
    assert len(rows) == 10 and rows[0] == 0 and rows[-1] == len(ids) - 1
    np.testing.assert_allclose(sample["points"], points[rows], atol=1e-6)


def test_suggestions_start_with_the_prefix(client, retriever):
    keys = [str(k) for k in retriever.artifact.queries.column("user_id").to_pylist()]
    ids = client.get("/explorer/queries", params={"prefix": "1", "limit": 50}).json()["ids"]
    assert [str(i) for i in ids] == [k for k in keys if k.startswith("1")][:50]
    assert client.get("/explorer/queries", params={"limit": 51}).status_code == 422


def test_the_page_is_served_with_a_strict_policy(client):
    response = client.get("/")
    assert response.status_code == 200 and "twotower explorer" in response.text
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert client.get("/explorer/queries/nobody").status_code == 404


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


def _shot(page, name: str) -> None:
    folder = os.environ.get("TWOTOWER_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"explorer-{name}.png"), full_page=True)


def _open(browser, url):
    # The test's own probes are evaluated strings, which the page's policy forbids.
    page = browser.new_page(viewport={"width": 1200, "height": 800}, bypass_csp=True)
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    return page


def _shown_ids(page, selector: str) -> list[str]:
    return page.eval_on_selector_all(f"{selector} li.item", "items => items.map(i => i.dataset.id)")


def _ranked(page, mode: str, title: str) -> list[str]:
    page.select_option("#seen-mode", mode)
    page.click("#user-go")
    page.wait_for_function(
        f"document.querySelector('#user-results-title').textContent.includes('{title}')"
    )
    return _shown_ids(page, "#user-results")


def _badges(page) -> list[str | None]:
    return page.eval_on_selector_all(
        "#user-results li.item",
        "items => items.map(i => i.querySelector('.badge') ? i.querySelector('.badge')"
        ".textContent : null)",
    )


def _test_items(run_dir: Path, user) -> list:
    """The oracle for held-out items: the run's own split, computed again."""
    config, _, _ = load_model(run_dir)
    _, split = load_data(config)
    mine = pc.equal(split.test.column(QUERY_ID), user)
    return split.test.filter(mine).column(ITEM_ID).to_pylist()


def test_the_page_in_a_browser(browser, demo_artifact, retriever, live_service):
    oracle = demo_artifact[1]
    user = next(  # a user with a seen item among the top K when seen items are kept
        u
        for row, u in enumerate(oracle.query_ids)
        if set(retriever.recall_users([u], K, exclude_seen=False)[0].items)
        & {oracle.item_ids[i] for i in oracle.seen[row].nonzero()[0]}
    )
    with live_service(create_app(demo_artifact[0])) as url:
        page = _open(browser, url)
        # User: suggestions, then the user's features, history and K results.
        page.fill("#user-id", str(user)[:1])
        page.wait_for_function("document.querySelectorAll('#user-suggestions option').length > 0")
        page.fill("#user-id", str(user))
        page.click("#user-go")
        page.wait_for_function(f"document.querySelectorAll('#user-results li.item').length == {K}")
        expected = retriever.recall_users([user], K)[0].items
        assert _shown_ids(page, "#user-results") == [str(i) for i in expected]
        assert page.locator("#user-history li.item").count() > 0
        assert page.locator("#user-features").inner_text().startswith("user_id")
        shown = K + page.locator("#user-history li.item").count()
        page.wait_for_function(f"document.querySelector('#user-map').dataset.drawn == '{shown}'")
        # Seen items kept: the ones the user interacted with are marked.
        seen = {
            str(oracle.item_ids[i]) for i in oracle.seen[oracle.query_ids.index(user)].nonzero()[0]
        }
        kept = _ranked(page, "mark", "marked")
        assert kept == [
            str(i) for i in retriever.recall_users([user], K, exclude_seen=False)[0].items
        ]
        assert _badges(page) == [("seen" if i in seen else None) for i in kept]
        assert any(_badges(page))
        # Every seen item but the held-out ones excluded, those marked.
        heldout = {str(i) for i in _test_items(oracle.run_dir, user)}
        assert heldout and heldout <= seen
        ranked = _ranked(page, "evaluate", "held-out items found")
        before = [i for i in oracle.item_ids if str(i) in seen - heldout]
        expected = retriever.recall_users([user], K, exclude_seen=False, exclude_items=before)
        assert ranked == [str(i) for i in expected[0].items]
        assert _badges(page) == [("held-out" if i in heldout else None) for i in ranked]
        _shot(page, "user")
        kept = [int(i) for i in kept]
        # Item: clicking a result opens its neighbours.
        first = kept[0]
        page.click("#user-results li.item >> nth=0")
        page.wait_for_function(
            f"document.querySelectorAll('#item-neighbours li.item').length == {K}"
        )
        assert page.is_visible("#view-item") and not page.is_visible("#view-user")
        similar = retriever.similar_items(first, K).items
        assert _shown_ids(page, "#item-neighbours") == [str(i) for i in similar]
        assert str(first) in page.locator("#item-fields").inner_text()
        _shot(page, "item")
        # An unknown user: a readable message, not a blank page.
        page.click("#tab-user")
        page.fill("#user-id", "no-such-user")
        page.click("#user-go")
        page.wait_for_selector("#error.shown")
        # the suggestions looked up as the id was typed (none match) come in after or
        # before the answer; either way they leave the message standing
        page.wait_for_function("document.querySelectorAll('#user-suggestions option').length == 0")
        assert "unknown query id(s): 'no-such-user'" in page.inner_text("#error")
        assert page.locator("#user-results li").count() == 0  # no stale answer beside it
        _shot(page, "error")
        # Search is unavailable on this artifact, and the page says why.
        page.click("#tab-search")
        assert "no text feature" in page.inner_text("#search-note")
        assert page.is_disabled("#search-text")


def _answered(page, read: str) -> list[str]:
    """Retrieves, waits for an answer that says it read ``read``; the items shown."""
    page.click("#user-go")
    page.wait_for_function(
        f"document.querySelector('#user-results-title').textContent.includes('{read}')"
    )
    return _shown_ids(page, "#user-results")


def test_recent_items_typed_in_the_page_are_the_query(
    browser, demo_artifact, retriever, live_service
):
    artifact = retriever.artifact
    user = artifact.queries.column(artifact.query_key)[3].as_py()
    typed = artifact.item_ids.to_pylist()[10:13]
    with live_service(create_app(demo_artifact[0])) as url:
        page = _open(browser, url)
        # A user id alone: its stored state.
        page.fill("#user-id", str(user))
        shown = _answered(page, "features: stored, history: stored")
        assert shown == [str(i) for i in retriever.recall_users([user], K)[0].items]
        # Recent items alone: a new visitor, served from them.
        page.fill("#user-id", "")
        page.fill("#user-recent", ", ".join(str(i) for i in typed))
        shown = _answered(page, "features: none, history: request")
        (expected,) = retriever.retrieve([Query(history=typed, k=K)])
        assert shown == [str(i) for i in expected.items]
        assert _shown_ids(page, "#user-history") == [str(i) for i in typed[::-1]]
        assert "from the request" in page.inner_text("#user-history-title")
        assert page.inner_text("#user-features") == "none stored"
        # Both: the typed items replace the user's stored ones.
        page.fill("#user-id", str(user))
        shown = _answered(page, "features: stored, history: request")
        (expected,) = retriever.retrieve([Query(user=user, history=typed, k=K)])
        assert shown == [str(i) for i in expected.items]
        assert "replacing the stored ones" in page.inner_text("#user-history-title")
        assert page.locator("#user-features").inner_text().startswith("user_id")
        _shot(page, "recent")
        # An unknown item typed: the service's message, no stale answer beside it.
        page.fill("#user-recent", f"{typed[0]}, nope")
        page.click("#user-go")
        page.wait_for_selector("#error.shown")
        assert "unknown item id(s): 'nope'" in page.inner_text("#error")
        assert page.locator("#user-results li").count() == 0


def test_search_updates_as_one_types(browser, text_artifact, live_service):
    from twotower.serving import Retriever

    folder, _ = text_artifact
    library = Retriever.load(folder)
    with live_service(create_app(folder)) as url:
        page = _open(browser, url)
        page.click("#tab-search")
        page.type("#search-text", "red shoes", delay=30)  # keystrokes, debounced
        expected = [str(i) for i in library.recall_text(["red shoes"], K)[0].items]
        page.wait_for_function(
            "ids => JSON.stringify([...document.querySelectorAll('#search-results li.item')]"
            ".map(i => i.dataset.id)) === JSON.stringify(ids)",
            arg=expected,
            timeout=30_000,
        )
        titles = page.eval_on_selector_all(
            "#search-results li.item .title", "items => items.map(i => i.textContent)"
        )
        assert len(titles) == K and all(
            title.split()[0] in ("red", "blue", "green") for title in titles
        )
        _shot(page, "search")


def test_a_multi_interest_model_colours_each_result_by_its_interest(
    browser, interests_artifact, live_service
):
    from twotower.serving import Retriever

    folder, oracle = interests_artifact
    library = Retriever.load(folder)
    user = next(  # a user whose top K comes from more than one interest
        u for u in oracle.query_ids if len(set(library.recall_users([u], K)[0].interests)) > 1
    )
    (expected,) = library.recall_users([user], K)
    with live_service(create_app(folder)) as url:
        page = _open(browser, url)
        page.fill("#user-id", str(user))
        page.click("#user-go")
        page.wait_for_function(f"document.querySelectorAll('#user-results li.item').length == {K}")
        assert _shown_ids(page, "#user-results") == [str(i) for i in expected.items]
        shown = page.eval_on_selector_all(
            "#user-results li.item", "items => items.map(i => Number(i.dataset.interest))"
        )
        assert shown == expected.interests
        chips = page.eval_on_selector_all(
            "#user-results li.item .interest",
            "chips => chips.map(c => [c.textContent, getComputedStyle(c).backgroundColor])",
        )
        assert [text for text, _ in chips] == [f"interest {k + 1}" for k in expected.interests]
        colour = dict(zip(expected.interests, (c for _, c in chips), strict=True))
        assert len(set(colour.values())) == len(colour)  # one colour per interest
        legend = page.inner_text("#user-legend")
        for k in set(expected.interests):
            assert f"retrieved by interest {k + 1}" in legend
        _shot(page, "interests")
