"""A service killed with SIGKILL loses no catalogue change it acknowledged.

``POST /admin/items`` answers once the change is on disk as the artifact's next version
(its files, then the manifest, each atomically): a service started again after SIGKILL
serves it. Killed at a random moment among changes, the service leaves the folder at
one whole version, at least the last one acknowledged (at most the one in flight
besides). The moment is drawn from a fresh seed each time and named in every failure;
``TWOTOWER_KILL_SEED`` replays one.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from twotower.serving import Artifact, Retriever


@pytest.fixture
def rng() -> tuple[random.Random, int]:
    seed = int(os.environ.get("TWOTOWER_KILL_SEED") or int.from_bytes(os.urandom(4), "big"))
    return random.Random(seed), seed


def test_a_service_killed_after_acknowledging_an_item_change_serves_it_again(
    demo_artifact, tmp_path, serve_process
):
    """The change is on disk as the artifact's next version before it is answered: a
    service started again after SIGKILL serves that version."""
    folder = Path(shutil.copytree(demo_artifact[0], tmp_path / "artifact"))
    user = demo_artifact[1].query_ids[3]
    artifact = Artifact.load(folder)
    with serve_process(folder) as (process, url), httpx.Client(base_url=url, timeout=60) as http:
        top = http.post("/recall", json={"user_id": user, "k": 3}).json()["items"]
        row = {**artifact.items.slice(0, 1).to_pylist()[0], "item_id": 900_100}
        answer = http.post("/admin/items", json={"block": top, "upsert": [row]})
        assert answer.status_code == 200, answer.text
        process.send_signal(signal.SIGKILL)  # no handler, no cleanup
        process.wait(timeout=30)
    acknowledged = answer.json()
    with serve_process(folder) as (_, url), httpx.Client(base_url=url, timeout=60) as http:
        ready = http.get("/ready").json()
        after = http.post("/recall", json={"user_id": user, "k": 10}).json()
        added = http.get("/items/900100/similar?k=3")
    assert (ready["artifact"], ready["version"]) == (acknowledged["artifact"], 2)
    assert after["version"] == 2 and not set(after["items"]) & set(top)
    assert added.status_code == 200
    (expected,) = Retriever.load(folder).recall_users([user], 10)
    assert after["items"] == expected.items


def test_a_service_killed_while_changing_items_keeps_every_acknowledged_change(
    demo_artifact, tmp_path, serve_process, rng
):
    """Changes sent one after another, the service killed at a random moment among
    them: the folder holds one whole version, at least the last one acknowledged."""
    rng, seed = rng
    folder = Path(shutil.copytree(demo_artifact[0], tmp_path / "artifact"))
    items = demo_artifact[1].item_ids
    acknowledged, refused, stop = [1], [], threading.Event()
    with serve_process(folder) as (process, url):

        def change() -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                for step in range(1000):
                    if stop.is_set():
                        return
                    verb = "block" if step % 2 == 0 else "unblock"
                    try:
                        answer = http.post("/admin/items", json={verb: items[:5]})
                    except httpx.HTTPError:  # killed meanwhile
                        return
                    refused.extend([answer.text] if answer.status_code != 200 else [])
                    acknowledged.append(answer.json().get("version", acknowledged[-1]))

        sender = threading.Thread(target=change)
        sender.start()
        delay = rng.uniform(0.2, 3.0)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        stop.set()
        sender.join(timeout=60)
    note = f"seed {seed}: killed {delay:.2f} s in, after version {acknowledged[-1]}"
    assert refused == [], note
    artifact = Artifact.load(folder)  # every file's checksum verified
    assert artifact.version >= acknowledged[-1], note
    assert artifact.version <= acknowledged[-1] + 1, note  # at most the one in flight
    with serve_process(folder) as (_, url), httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/ready").json()["version"] == artifact.version, note
        answer = http.post("/admin/items", json={"block": [items[9]]})
    assert answer.status_code == 200 and answer.json()["version"] == artifact.version + 1, note
