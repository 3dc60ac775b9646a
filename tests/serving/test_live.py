"""The service over real HTTP: reloads under concurrent load drop nothing; SIGHUP reloads."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from twotower.export import export_run
from twotower.serving import Retriever
from twotower.serving.http import create_app


@pytest.fixture
def served(demo_artifact, tmp_path, live_service):
    """(base URL, artifact folder, run folder): a uvicorn server on a free loopback port."""
    folder = tmp_path / "artifact"
    shutil.copytree(demo_artifact[0], folder)
    with live_service(create_app(folder)) as url:
        yield url, folder, demo_artifact[1].run_dir


def test_reloads_under_concurrent_requests_lose_none(served, retriever, demo_artifact):
    url, folder, run_dir = served
    users = demo_artifact[1].query_ids[:40]
    expected = {r.query: r.items for r in retriever.recall_users(users, 10)}
    stop = threading.Event()
    answers: list[tuple[int, str, object, list]] = []
    failures: list[BaseException] = []

    def client(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            i = offset
            while not stop.is_set():
                user = users[i % len(users)]
                try:
                    response = http.post("/recall", json={"user_id": user, "k": 10})
                    body = response.json()
                    answers.append((response.status_code, body.get("artifact"), user, body))
                except BaseException as err:  # noqa: BLE001 (any failure is the finding)
                    failures.append(err)
                i += 7

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    fingerprints = []
    with httpx.Client(base_url=url, timeout=60) as admin:
        for kind in ("flat", "exact", "flat"):
            time.sleep(0.3)
            export_run(run_dir, folder, index=kind)  # replaces the folder atomically
            reload = admin.post("/admin/reload")
            assert reload.status_code == 200, reload.text
            fingerprints.append(reload.json()["artifact"])
        time.sleep(0.3)
    stop.set()
    for thread in threads:
        thread.join()
    assert not failures
    assert len(answers) > 50
    assert all(status == 200 for status, *_ in answers), {a[0] for a in answers}
    assert all(body["items"] == expected[user] for _, _, user, body in answers)
    served_by = {artifact for _, artifact, _, _ in answers}
    assert len(set(fingerprints)) == 3  # each export is a new artifact
    assert len(served_by) >= 2  # answers came from before and after reloads
    assert served_by <= {retriever.artifact.fingerprint, *fingerprints}


def test_twotower_serve_reloads_on_sighup_and_stops_cleanly(demo_artifact, tmp_path):
    folder = tmp_path / "artifact"
    shutil.copytree(demo_artifact[0], folder)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "twotower", "serve", str(folder), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        line = process.stdout.readline().decode()
        assert "Serving" in line and "http://127.0.0.1:" in line, line
        url = line.split(" on ")[1].split(" ")[0]
        with httpx.Client(base_url=url, timeout=30) as http:
            before = http.get("/ready").json()["artifact"]
            user = demo_artifact[1].query_ids[0]
            assert http.post("/recall", json={"user_id": user}).status_code == 200
            export_run(demo_artifact[1].run_dir, folder, index="flat")
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while http.get("/ready").json()["artifact"] == before:
                assert time.monotonic() < deadline, "no reload after SIGHUP"
                time.sleep(0.05)
            assert http.get("/ready").json()["index"] == "flat"
            assert http.post("/recall", json={"user_id": user}).status_code == 200
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then ends by the signal it caught
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert b"Traceback" not in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_refuses_a_corrupt_artifact_with_one_line(demo_artifact, tmp_path):
    folder = tmp_path / "artifact"
    shutil.copytree(demo_artifact[0], folder)
    (folder / "queries.parquet").write_bytes(b"not parquet")
    command = [sys.executable, "-m", "twotower", "serve", str(folder), "--port", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "queries.parquet: corrupt" in result.stderr
    assert "Traceback" not in result.stderr


def test_retriever_of_the_flat_export_gives_the_same_items(demo_artifact, tmp_path):
    """What the reload test relies on: flat and exact artifacts of one run agree."""
    export_run(demo_artifact[1].run_dir, tmp_path / "flat", index="flat")
    flat = Retriever.load(Path(tmp_path / "flat"))
    exact = Retriever.load(demo_artifact[0])
    users = demo_artifact[1].query_ids[:40]
    assert [r.items for r in flat.recall_users(users, 10)] == [
        r.items for r in exact.recall_users(users, 10)
    ]
