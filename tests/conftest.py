"""Two tiny trained runs, exported once per session (the demo features, and DSSM-style
text), and a live service on a loopback port."""

from __future__ import annotations

import contextlib
import dataclasses
import os
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
