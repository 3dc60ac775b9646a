"""Tiny trained runs, exported once per session (the demo features, DSSM-style text and
variants); a live service on a loopback port, in a thread or in a process of its own;
and a real ``redis-server`` for the user-state store's tests."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import uvicorn

from twotower.config import Config, apply_overrides
from twotower.data.config import DataConfig, FeatureTableConfig, InteractionsConfig, SplitConfig
from twotower.data.matrix import interaction_matrix
from twotower.demo import _write_synthetic, demo_config
from twotower.export import export_run
from twotower.features.specs import FeaturesConfig, IdFeature, TextFeature
from twotower.serving import Retriever
from twotower.serving.server import bind
from twotower.sources import load_data
from twotower.threads import available_cpus
from twotower.towers.config import MLPConfig, ModelConfig
from twotower.towers.model import embed_rows
from twotower.training.config import TrainingConfig
from twotower.training.examples import TrainingExamples
from twotower.training.run import load_model, train_run


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (the default, pyproject.toml): a worker per CPU this process may use,
    its affinity capped by a container's quota, not the host's every core."""
    return available_cpus()


def pytest_configure(config: pytest.Config) -> None:
    """Each pytest-xdist worker keeps to a core of its own, and so do the processes its
    tests start: torch then computes on the one core it has
    (``twotower.threads.available_cpus``) instead of every worker's threads waiting on
    each other's."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker.startswith("gw") and len(cores) > 1:
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})


@dataclasses.dataclass(frozen=True)
class Oracle:
    """What the trained model itself says, for checking the artifact's answers.

    query_vectors: (Q, D) every known query through the trained query tower, with
    every logged interaction in its history; item_vectors: (N, D); seen: (Q, N) bool.
    """

    run_dir: Path
    query_ids: list
    item_ids: list
    query_vectors: np.ndarray
    item_vectors: np.ndarray
    seen: np.ndarray


def tiny_demo_config(folder: Path, *overrides: str) -> Config:
    """The demo's config at a tiny size (``overrides`` after it), its data written in
    ``folder``."""
    config = demo_config(
        [
            "data.synthetic.num_queries=200",
            "data.synthetic.num_items=100",
            "model.query.widths=[16]",
            "model.item.widths=[16]",
            "training.epochs=1",
            "data.synthetic.interactions_per_query=8",
            "training.batch_size=256",
            "training.tensorboard=false",
            "training.ks=[10]",
            "training.device=cpu",
            *overrides,
        ]
    )
    return dataclasses.replace(config, data=_write_synthetic(config, folder))


@pytest.fixture(scope="session")
def tiny_demo():
    """``tiny_demo(folder, *overrides)``: ``tiny_demo_config``, for test modules."""
    return tiny_demo_config


@pytest.fixture(scope="session")
def tiny_text():
    """``tiny_text(folder)``: ``tiny_text_config``, for test modules."""
    return tiny_text_config


def tiny_text_config(folder: Path, item_key_offset: float = 0) -> Config:
    """Search logs by hand: query texts like "red shoes", items titled "red shoes 2".

    A fractional ``item_key_offset`` keys the items by floats (0.5, 1.5, ...).
    """
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [(c, t) for c in ("red", "blue", "green") for t in ("shoes", "shirt", "hat")]
    titles = [f"{c} {t} {n}" for c, t in pairs for n in range(3)]  # 27 items
    texts = [f"{c} {t}" for c, t in pairs for _ in range(5)]  # 45 queries
    query = np.repeat(np.arange(len(texts)), 3)
    item = (query // 5) * 3 + np.tile(np.arange(3), len(texts)) + item_key_offset
    paths = {name: folder / f"{name}.parquet" for name in ("log", "queries", "items")}
    pq.write_table(pa.table({"q": query, "i": item, "t": np.arange(len(query))}), paths["log"])
    pq.write_table(pa.table({"q": np.arange(len(texts)), "text": texts}), paths["queries"])
    keys = np.arange(len(titles)) + item_key_offset
    pq.write_table(pa.table({"i": keys, "title": titles}), paths["items"])
    return Config(
        data=DataConfig(
            source="files",
            interactions=InteractionsConfig(paths["log"], query_id="q", item_id="i", timestamp="t"),
            queries=FeatureTableConfig(paths["queries"], key="q"),
            items=FeatureTableConfig(paths["items"], key="i"),
        ),
        split=SplitConfig(method="leave_last_out"),
        features=FeaturesConfig(
            query=[TextFeature("text", "text", buckets=256, dim=16)],
            item=[IdFeature("item_id", "i", dim=8), TextFeature("title", "title", buckets=256)],
        ),
        model=ModelConfig(query=MLPConfig(widths=[16]), item=MLPConfig(widths=[16])),
        training=TrainingConfig(epochs=1, batch_size=32, tensorboard=False, ks=[10], device="cpu"),
    )


def oracle_of(run_dir: Path) -> Oracle:
    config, pipeline, model = load_model(run_dir)
    dataset, _ = load_data(config)
    served = pipeline.with_histories(dataset, dataset.interactions)
    seen = interaction_matrix(dataset.interactions, dataset.num_queries, dataset.num_items)
    return Oracle(
        run_dir,
        dataset.queries.column(dataset.query_key).to_pylist(),
        dataset.items.column(dataset.item_key).to_pylist(),
        embed_rows(model.query_tower, served, "query", dataset.queries).numpy(),
        embed_rows(model.item_tower, served, "item", dataset.items).numpy(),
        seen.toarray() > 0,
    )


@pytest.fixture(scope="session")
def demo_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Oracle]:
    """An exported artifact of a tiny demo run, and the trained model's own answers."""
    folder = Path(tmp_path_factory.mktemp("demo"))
    train_run(tiny_demo_config(folder / "data"), folder / "run")
    export_run(folder / "run", folder / "artifact")
    return folder / "artifact", oracle_of(folder / "run")


@pytest.fixture(scope="session")
def sequence_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Oracle]:
    """As ``demo_artifact``, with the history encoded by a causal transformer."""
    folder = Path(tmp_path_factory.mktemp("sequence"))
    config = apply_overrides(
        tiny_demo_config(folder / "data"),
        ["features.query.history.encoder=transformer", "features.query.history.heads=2"],
    )
    train_run(config, folder / "run")
    export_run(folder / "run", folder / "artifact")
    return folder / "artifact", oracle_of(folder / "run")


@pytest.fixture(scope="session")
def item_bias_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Oracle]:
    """As ``demo_artifact``, with ``model.item_bias``."""
    folder = Path(tmp_path_factory.mktemp("item-bias"))
    config = apply_overrides(
        tiny_demo_config(folder / "data"), ["model.item_bias=true", "training.epochs=2"]
    )
    train_run(config, folder / "run")
    export_run(folder / "run", folder / "artifact")
    return folder / "artifact", oracle_of(folder / "run")


@pytest.fixture(scope="session")
def timed_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Oracle]:
    """As ``demo_artifact``, with attention pooling that reads time gaps."""
    folder = Path(tmp_path_factory.mktemp("timed"))
    history = "features.query.history"
    config = apply_overrides(
        tiny_demo_config(folder / "data"),
        [f"{history}.encoder=attention", f"{history}.time_buckets=8", f"{history}.time_unit=1"],
    )
    train_run(config, folder / "run")
    export_run(folder / "run", folder / "artifact")
    return folder / "artifact", oracle_of(folder / "run")


@pytest.fixture(scope="session")
def interests_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Oracle]:
    """As ``demo_artifact``, with a three-interest (self-attentive) query tower; the
    oracle's query vectors are (Q, 3, D)."""
    folder = Path(tmp_path_factory.mktemp("interests"))
    config = apply_overrides(
        tiny_demo_config(folder / "data"), ["features.query.history.interests=3"]
    )
    train_run(config, folder / "run")
    export_run(folder / "run", folder / "artifact")
    return folder / "artifact", oracle_of(folder / "run")


@pytest.fixture(scope="session")
def retriever(demo_artifact) -> Retriever:
    return Retriever.load(demo_artifact[0])


@pytest.fixture(scope="session")
def text_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(artifact, run folder) of a tiny run whose only query feature is text."""
    folder = Path(tmp_path_factory.mktemp("text"))
    train_run(tiny_text_config(folder / "data"), folder / "run")
    export_run(folder / "run", folder / "artifact")
    return folder / "artifact", folder / "run"


@pytest.fixture(scope="session")
def float_key_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The artifact of a tiny text run whose items are keyed by floats (0.5, 1.5, ...)."""
    folder = Path(tmp_path_factory.mktemp("float-keys"))
    train_run(tiny_text_config(folder / "data", item_key_offset=0.5), folder / "run")
    export_run(folder / "run", folder / "artifact")
    return folder / "artifact"


@pytest.fixture(scope="session")
def training_examples_members() -> list[str]:
    """Every attribute and method the ``TrainingExamples`` protocol declares."""
    declared = [name for name in vars(TrainingExamples) if not name.startswith("_")]
    return sorted({*TrainingExamples.__annotations__, *declared, "__len__"})


@contextlib.contextmanager
def _serve(app) -> Iterator[str]:
    """Serves an ASGI app with uvicorn on a free loopback port, in a thread; yields its URL."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the service did not start within 30 s"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="session")
def live_service():
    """``with live_service(app) as url:`` serves ``app`` on a free loopback port."""
    return _serve


@contextlib.contextmanager
def _serve_process(folder: Path, *options: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """``twotower serve FOLDER --port 0 OPTIONS`` in a process of its own: yields (the
    process, its URL) once it serves; on exit stops it (SIGTERM) unless it ended. What
    it wrote is then left to read in ``process.stdout``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "twotower", "serve", str(folder), "--port", "0", *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        line = process.stdout.readline().decode()
        started = "Serving" in line and "http://127.0.0.1:" in line
        assert started, line + process.stdout.read().decode()
        yield process, line.split(" on ")[1].split(" ")[0]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(scope="session")
def serve_process():
    """``with serve_process(folder, *options) as (process, url):`` runs ``twotower serve``."""
    return _serve_process


@pytest.fixture
def served_metrics():
    """Scores an artifact's answers to the test users against their test items."""
    return _served_metrics


def _served_metrics(artifact, split, dataset, part_before: list, ks: list[int]) -> dict:
    """Each test user's answer from the artifact, scored against its test items as
    ``twotower evaluate`` scores them (seen items out of the held-out ones)."""
    import numpy as np
    import pyarrow as pa

    from twotower.data.matrix import interaction_matrix
    from twotower.evaluation.metrics import ranking_metrics
    from twotower.serving.retriever import Retriever

    n_q, n_i = dataset.num_queries, dataset.num_items
    held_out = interaction_matrix(split.test, n_q, n_i)
    seen = interaction_matrix(pa.concat_tables(part_before), n_q, n_i)
    held_out = (held_out - held_out.multiply(seen)).tocsr()
    held_out.eliminate_zeros()
    users = np.flatnonzero(np.diff(held_out.indptr))
    retriever = Retriever.load(artifact)
    keys = dataset.queries.column(dataset.query_key).to_pylist()
    answers = retriever.recall_users([keys[u] for u in users], max(ks))
    row = {key: i for i, key in enumerate(dataset.items.column(dataset.item_key).to_pylist())}
    ranked = np.array([[row[item] for item in a.items] for a in answers])
    return {f"test/{k}": v for k, v in ranking_metrics(ranked, held_out[users], ks).items()}


# A real redis-server: on a free loopback port, its files in a temporary folder,
# persisting every write before it answers (AOF, fsync always), as docs/serving.md
# recommends.
REDIS_SERVER = shutil.which("redis-server")
NO_REDIS = "redis-server is not installed (Debian: apt-get install redis-server)"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One ``redis-server`` process, restartable on the same port and folder.

    Attributes:
        folder: its working folder (the append-only file, the log).
        port: its loopback port, the same across restarts.
        url: ``redis://127.0.0.1:PORT/0``.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Starts the server (loading what its folder holds) and waits until it answers."""
        assert REDIS_SERVER is not None, NO_REDIS
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.folder),
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--save", "",
                "--logfile", "redis.log",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stops the server with ``sig`` (SIGKILL: as if the machine lost it) and waits."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)  # a paused server must run to stop
                self.process.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None

    def pause(self) -> None:
        """Freezes the server (SIGSTOP): connections open, no answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Lets a paused server run again."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


@contextlib.contextmanager
def running_redis(folder: Path) -> Iterator[RedisServer]:
    """A started ``RedisServer`` in ``folder``, stopped on exit; skips without one."""
    if REDIS_SERVER is None:
        pytest.skip(NO_REDIS)
    server = RedisServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` of this test's own (``.url``), stopped after it."""
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One ``redis-server`` for a test module whose tests use keys of their own."""
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server
