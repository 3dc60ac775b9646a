"""Several worker processes: they answer as one process does, a reload switches every
worker or none (through a real service, and the parent's two phases on a planted
failure), a killed worker is started again, events need a shared (Redis) store and
through it reach every worker, and the large files are mapped, not read."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from multiprocessing import Pipe
from pathlib import Path

import httpx
import numpy as np
import pytest

from twotower.export import export_run
from twotower.serving import Artifact, Retriever
from twotower.serving.server import bind
from twotower.serving.settings import ServiceConfig
from twotower.serving.stores import Event
from twotower.serving.stores.redis_store import RedisStore
from twotower.serving.workers import Supervisor, _Worker


def _fingerprints(url: str, user, count: int = 40) -> set[str]:
    """The artifacts that answer ``count`` requests, each on a new connection (so the
    workers share them)."""
    seen = set()
    for _ in range(count):
        with httpx.Client(base_url=url, timeout=30) as http:
            response = http.post("/recall", json={"user_id": user, "k": 5})
            assert response.status_code == 200, response.text
            seen.add(response.json()["artifact"])
    return seen


def _children(parent: int) -> dict[int, str]:
    command = ["ps", "-ww", "--ppid", str(parent), "-o", "pid=,args="]
    lines = subprocess.run(command, capture_output=True).stdout.decode().splitlines()
    return {int(line.split()[0]): line for line in lines}


def _worker_pids(parent: int) -> set[int]:
    """The workers of a service: the children of the fork server the parent started."""
    servers = [pid for pid, args in _children(parent).items() if "forkserver" in args]
    return {pid for server in servers for pid in _children(server)}


@pytest.fixture(scope="module")
def two_workers(demo_artifact, tmp_path_factory, serve_process):
    """(process, URL, artifact folder, run folder) of ``twotower serve --workers 2``."""
    folder = Path(tmp_path_factory.mktemp("workers")) / "artifact"
    shutil.copytree(demo_artifact[0], folder)
    with serve_process(folder, "--workers", "2") as (process, url):
        yield process, url, folder, demo_artifact[1].run_dir
    output = process.stdout.read()
    assert process.returncode in (0, -signal.SIGTERM), output.decode()
    assert b"Traceback" not in output, output.decode()


def test_two_workers_answer_as_one_process(two_workers, retriever, demo_artifact):
    process, url, _, _ = two_workers
    assert len(_worker_pids(process.pid)) == 2
    users = demo_artifact[1].query_ids[::3]  # 67 users, each on a new connection
    expected = retriever.recall_users(users, 10)
    for user, result in zip(users, expected, strict=True):
        with httpx.Client(base_url=url, timeout=30) as http:  # a new connection each
            body = http.post("/recall", json={"user_id": user, "k": 10}).json()
            assert body["items"] == result.items
            assert np.allclose(body["scores"], result.scores, atol=1e-5)
    similar = retriever.similar_items(retriever.item_id_values[3].item(), 7)
    with httpx.Client(base_url=url, timeout=30) as http:
        body = http.get(f"/items/{retriever.item_id_values[3].item()}/similar?k=7").json()
    assert body["items"] == similar.items


def test_a_reload_switches_every_worker_or_none(two_workers, demo_artifact):
    process, url, folder, run_dir = two_workers
    user = demo_artifact[1].query_ids[0]
    (before,) = _fingerprints(url, user)
    export_run(run_dir, folder, index="flat")  # a new artifact in the folder
    new = Artifact.load(folder).fingerprint
    assert new != before
    with httpx.Client(base_url=url, timeout=60) as admin:
        reload = admin.post("/admin/reload")
    assert reload.status_code == 200, reload.text
    assert reload.json()["artifact"] == new and reload.json()["previous"] == before
    assert _fingerprints(url, user) == {new}  # both workers serve it

    (folder / "seen.npz").write_bytes(b"broken")  # every worker fails to load it
    with httpx.Client(base_url=url, timeout=60) as admin:
        failed = admin.post("/admin/reload")
    assert failed.status_code == 409
    assert "seen.npz" in failed.json()["detail"] and f"still serving {new}" in failed.text
    assert _fingerprints(url, user) == {new}

    export_run(run_dir, folder, index="exact")
    newest = Artifact.load(folder).fingerprint
    process.send_signal(signal.SIGHUP)  # to the parent: every worker reloads
    deadline = time.monotonic() + 60
    while _fingerprints(url, user, 10) != {newest}:
        assert time.monotonic() < deadline, "no reload of every worker after SIGHUP"
        time.sleep(0.1)


def test_a_killed_worker_is_started_again(two_workers, demo_artifact):
    process, url, _, _ = two_workers
    before = _worker_pids(process.pid)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while len(_worker_pids(process.pid) - {victim}) < 2:
        assert time.monotonic() < deadline, "the killed worker was not started again"
        time.sleep(0.1)
    assert len(_fingerprints(url, demo_artifact[1].query_ids[1])) == 1


def test_events_with_states_in_each_workers_memory_are_refused_naming_state(two_workers):
    _, url, _, _ = two_workers
    with httpx.Client(base_url=url, timeout=30) as http:
        answer = http.post("/events", json={"events": [{"user": 1, "item": 1}]})
    assert answer.status_code == 409
    assert "--state redis://HOST:PORT/DB" in answer.json()["detail"]


def test_an_item_change_through_one_worker_is_served_by_every_worker(two_workers, demo_artifact):
    """The change is written once, then every worker moves to its version (the
    parent's reload, each worker reading only the new version's files); each worker
    in turn is frozen (SIGSTOP), so the other one answers."""
    process, url, folder, _ = two_workers
    user = demo_artifact[1].query_ids[2]
    (before,) = _fingerprints(url, user)
    top = _posted(url, "/recall", {"user_id": user, "k": 3})["items"]
    answer = _posted(url, "/admin/items", {"block": top})
    assert answer["previous"] == before and answer["blocked"] == 3
    written = Artifact.load(folder)
    assert (answer["artifact"], answer["version"]) == (written.fingerprint, written.version)
    for frozen in sorted(_worker_pids(process.pid)):
        os.kill(frozen, signal.SIGSTOP)
        try:
            after = _posted(url, "/recall", {"user_id": user, "k": 10})
        finally:
            os.kill(frozen, signal.SIGCONT)
        assert (after["artifact"], after["version"]) == (answer["artifact"], answer["version"])
        assert not set(after["items"]) & set(top)


def _posted(url: str, path: str, body: dict) -> dict:
    with httpx.Client(base_url=url, timeout=30) as http:  # a new connection
        answer = http.post(path, json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_with_redis_an_event_through_one_worker_changes_the_others_answer(
    redis_server, demo_artifact, serve_process
):
    """Each worker in turn is frozen (SIGSTOP), so the other one takes the connection."""
    folder, oracle = demo_artifact
    store = RedisStore(redis_server.url)
    store.load_artifact(Artifact.load(folder))
    store.close()
    user = oracle.query_ids[6]
    unseen = [oracle.item_ids[i] for i in np.flatnonzero(~oracle.seen[6])[:2]]
    events = [Event(user, unseen[0], 1e12), Event(user, unseen[1], 1e12 + 1)]
    with serve_process(folder, "--workers", "2", "--state", redis_server.url) as (process, url):
        workers = sorted(_worker_pids(process.pid))
        assert len(workers) == 2
        answers = []
        for sender, reader, event in zip(workers, workers[::-1], events, strict=True):
            os.kill(reader, signal.SIGSTOP)
            try:
                body = {
                    "events": [{"user": user, "item": event.item, "timestamp": event.timestamp}]
                }
                assert _posted(url, "/events", body)["stored"] == 1
            finally:
                os.kill(reader, signal.SIGCONT)
            os.kill(sender, signal.SIGSTOP)
            try:
                answers.append(_posted(url, "/recall", {"user_id": user, "k": 10}))
            finally:
                os.kill(sender, signal.SIGCONT)
    for sent, answer in enumerate(answers, start=1):
        retriever = Retriever.load(folder)  # the oracle: memory state, the same events
        assert retriever.ingest(events[:sent]) == []
        (expected,) = retriever.recall_users([user], 10)
        assert answer["items"] == expected.items
        np.testing.assert_allclose(answer["scores"], expected.scores, rtol=1e-5, atol=1e-6)


class _FakeProcess:
    """What the parent uses of a worker process, for a worker run on a thread."""

    def __init__(self, thread: threading.Thread) -> None:
        self.thread, self.pid, self.exitcode = thread, 0, None
        self.sentinel = os.open(os.devnull, os.O_RDONLY)

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout=None) -> None:
        self.thread.join(timeout)

    def terminate(self) -> None:
        pass

    kill = terminate


def _fake_worker(conn, prepared: str | None, log: list) -> None:
    """Answers like a worker: ``prepared`` is the fingerprint it loads, None: it fails."""
    conn.send(("ready", "old"))
    while True:
        message = conn.recv()
        log.append(message[0])
        if message[0] == "prepare":
            conn.send(("ok", prepared) if prepared else ("failed", "planted failure"))
        elif message[0] == "commit":
            conn.send(("committed",))
        elif message[0] == "abort":
            return


@pytest.mark.parametrize(
    "loads, committed",
    [(["new", "new", "new"], True), (["new", None, "new"], False), (["new", "other"], False)],
)
def test_the_parent_commits_only_when_every_worker_loaded_one_artifact(loads, committed):
    sock = bind("127.0.0.1", 0)
    supervisor = Supervisor(Path("."), ServiceConfig(), sock, count=0)
    logs = []
    for number, prepared in enumerate(loads):
        parent_end, child_end = Pipe()
        logs.append([])
        thread = threading.Thread(target=_fake_worker, args=(child_end, prepared, logs[-1]))
        thread.start()
        supervisor.workers.append(_Worker(number, _FakeProcess(thread), parent_end))
    assert supervisor.start() == "old"
    answer = supervisor.reload()
    if committed:
        assert answer["artifact"] == "new" and answer["previous"] == "old"
        assert all(log == ["prepare", "commit"] for log in logs)
        assert supervisor.fingerprint == "new"
    else:
        assert "reload failed" in answer["error"] and "still serving old" in answer["error"]
        for worker in supervisor.workers:
            worker.process.join(5)  # each ends on its abort
        assert all(log == ["prepare", "abort"] for log in logs)  # nobody swapped
        assert supervisor.fingerprint == "old"
    for worker in supervisor.workers:
        if worker.process.is_alive():
            worker.conn.send(("abort", "done"))
        worker.process.join(5)
        os.close(worker.process.sentinel)
    sock.close()


def _mapped_files() -> set[str]:
    """The files this process has mapped into memory (/proc/self/maps)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {line.split(maxsplit=5)[5] for line in lines if len(line.split(maxsplit=5)) == 6}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_the_large_files_are_mapped_not_read(demo_artifact, tmp_path):
    """Item vectors, the index and the tower's weights: what N workers share."""
    export_run(demo_artifact[1].run_dir, tmp_path / "flat", index="flat")
    kept = [Retriever.load(demo_artifact[0]), Retriever.load(tmp_path / "flat")]
    mapped = _mapped_files()
    for folder, index_file in (
        (demo_artifact[0], "vectors.npy"),
        (tmp_path / "flat", "faiss.index"),
    ):
        for name in ("item_vectors.npy", f"index/{index_file}", "query_tower.pt"):
            assert str((Path(folder) / name).resolve()) in mapped, name
    assert isinstance(kept[0].artifact.item_vectors, np.memmap)


def test_a_served_app_hands_the_interpreter_lock_on_every_half_millisecond(monkeypatch):
    """uvicorn runs with the service's switch interval (the event loop and the batch
    worker share the lock), not Python's 5 ms."""
    import sys

    import uvicorn

    from twotower.serving import workers

    seen = []
    monkeypatch.setattr(
        uvicorn.Server, "run", lambda self, sockets: seen.append((sys.getswitchinterval(), sockets))
    )
    before = sys.getswitchinterval()
    sock = bind("127.0.0.1", 0)
    try:
        workers.serve_app(lambda scope, receive, send: None, sock)
    finally:
        sys.setswitchinterval(before)
        sock.close()
    assert before == pytest.approx(0.005)
    assert seen == [(pytest.approx(0.0005), [sock])]
