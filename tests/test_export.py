"""Exporting a run: what the artifact holds, and that it is replaced all at once or not at all."""

from __future__ import annotations

import json
import os
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch

import twotower.index
import twotower.serving.artifact
import twotower.storage
from twotower.config import to_dict
from twotower.data.matrix import interaction_matrix
from twotower.errors import ConfigError, DataError
from twotower.export import export_run
from twotower.serving import Artifact
from twotower.sources import load_data
from twotower.storage import sha256_file
from twotower.towers.model import embed_rows
from twotower.training.run import load_model, train_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_demo) -> Path:
    """A tiny demo run: 200 users, 100 items, one epoch."""
    folder = Path(tmp_path_factory.mktemp("export"))
    train_run(tiny_demo(folder / "data"), folder / "run")
    return folder / "run"


@pytest.fixture(scope="module")
def exported(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = Path(tmp_path_factory.mktemp("artifact")) / "artifact"
    return out, export_run(run_dir, out)


def siblings(out: Path) -> list[str]:
    """What lies beside ``out``, besides the exports' lock file."""
    return sorted(p.name for p in out.parent.iterdir() if p.name != f".{out.name}.lock")


def test_manifest_lists_every_file_with_its_checksum(exported, run_dir):
    out, manifest = exported
    assert json.loads((out / "manifest.json").read_text()) == manifest
    files = {
        p.relative_to(out).as_posix(): sha256_file(p)
        for p in out.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    }
    assert manifest["files"] == files
    assert {"features/features.json", "query_tower.pt", "item_vectors.npy", "items.parquet"} < set(
        files
    )
    config, _, _ = load_model(run_dir)
    assert manifest["config"] == to_dict(config)
    assert manifest["metrics"] == json.loads((run_dir / "metrics.json").read_text())
    assert manifest["format_version"] == 3 and manifest["twotower_version"] == version("twotower")
    assert (manifest["num_items"], manifest["num_queries"], manifest["embedding_dim"]) == (
        100,
        200,
        16,
    )
    assert (manifest["index"], manifest["query_key"], manifest["item_key"]) == (
        "exact",
        "user_id",
        "item_id",
    )
    assert "T" in manifest["created"]


def test_rebuilt_query_tower_gives_the_trained_vectors(exported, run_dir):
    out, _ = exported
    artifact = Artifact.load(out)
    config, pipeline, model = load_model(run_dir)
    dataset, _ = load_data(config)
    served = pipeline.with_histories(dataset, dataset.interactions)
    trained = embed_rows(model.query_tower, served, "query", dataset.queries)
    rebuilt = embed_rows(artifact.query_tower, artifact.pipeline, "query", artifact.queries)
    assert torch.equal(trained, rebuilt)
    # the history feature's table is the item tower's id table, saved with the query tower
    state = torch.load(out / "query_tower.pt", weights_only=True)
    shared = model.item_tower.encoders.encoders["item_id"].table.weight
    assert torch.equal(state["encoders.encoders.history.table.weight"], shared)
    items = embed_rows(model.item_tower, pipeline, "item", dataset.items).numpy()
    np.testing.assert_array_equal(artifact.item_vectors, items)


def test_histories_and_seen_items_cover_every_logged_interaction(exported, run_dir):
    out, _ = exported
    artifact = Artifact.load(out)
    config, pipeline, _ = load_model(run_dir)
    dataset, split = load_data(config)
    everything = pipeline.with_histories(dataset, dataset.interactions)
    histories = artifact.pipeline.transform("query", artifact.queries)["history"]
    assert torch.equal(histories, everything.transform("query", dataset.queries)["history"])
    trained = pipeline.transform("query", dataset.queries)["history"]
    assert (histories > 0).sum() > (trained > 0).sum()  # valid and test items are in now
    logged = interaction_matrix(dataset.interactions, dataset.num_queries, dataset.num_items)
    assert (artifact.seen != logged).nnz == 0


def test_export_replaces_an_existing_artifact_and_leaves_nothing_beside_it(run_dir, tmp_path):
    out = tmp_path / "artifact"
    export_run(run_dir, out)
    (out / "stale.txt").write_text("from before")
    manifest = export_run(run_dir, out)
    assert not (out / "stale.txt").exists()
    assert Artifact.load(out).manifest == manifest
    assert siblings(out) == ["artifact"]


def test_a_crash_while_building_leaves_the_previous_artifact(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "artifact"
    before = export_run(run_dir, out)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    # seen.npz is written after the features, the tower, the vectors and the tables
    monkeypatch.setattr(twotower.serving.artifact, "save_csr", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(run_dir, out)
    assert Artifact.load(out).manifest == before
    assert siblings(out) == ["artifact"]


def test_a_failed_switch_puts_the_previous_artifact_back(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "artifact"
    before = export_run(run_dir, out)
    rename = os.rename

    def fail_moving_in(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError("rename failed")
        rename(src, dst)

    monkeypatch.setattr(twotower.storage, "exchange_paths", lambda a, b: False)  # two renames
    monkeypatch.setattr(twotower.storage.os, "rename", fail_moving_in)
    with pytest.raises(OSError, match="rename failed"):
        export_run(run_dir, out)
    monkeypatch.undo()
    assert Artifact.load(out).manifest == before
    assert siblings(out) == ["artifact"]


def test_the_swap_is_one_step_where_the_file_system_can(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "artifact"
    export_run(run_dir, out)
    renames = []
    rename = os.rename
    monkeypatch.setattr(twotower.storage.os, "rename", lambda *a: renames.append(a) or rename(*a))
    manifest = export_run(run_dir, out)
    assert renames == []  # renameat2(RENAME_EXCHANGE): never a moment without ``out``
    assert Artifact.load(out).manifest == manifest
    assert siblings(out) == ["artifact"]


def test_the_next_export_repairs_what_a_killed_one_left(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "artifact"
    before = export_run(run_dir, out)
    # Killed between the two renames of the fallback swap: the artifact is aside...
    os.rename(out, tmp_path / ".artifact.k2j4.old")
    # ...and killed while building: a half-written staging folder.
    (tmp_path / ".artifact.x9q1.tmp").mkdir()
    (tmp_path / ".artifact.x9q1.tmp" / "item_vectors.npy").write_bytes(b"\x93NUMPY")

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(twotower.serving.artifact, "save_csr", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(run_dir, out)  # fails, but only after putting things right
    assert Artifact.load(out).manifest == before
    assert siblings(out) == ["artifact"]


def test_refusals_name_the_path_and_touch_nothing(run_dir, tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}: no best checkpoint"):
        export_run(tmp_path, tmp_path / "artifact")
    with pytest.raises(ConfigError, match="unknown index 'annoy'; choose auto or one of exact"):
        export_run(run_dir, tmp_path / "artifact", index="annoy")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="precious: exists and is not an exported artifact"):
        export_run(run_dir, precious)
    assert (precious / "notes.txt").read_text() == "mine"
    assert siblings(precious) == ["precious"]


def test_manifest_records_the_index_recall_against_exact_search(exported):
    _, manifest = exported
    check = manifest["index_recall"]
    assert check["k"] == 10 and check["exact"] and check["recall"] == 1.0
    assert 0 < check["queries"] <= 1000


def test_an_approximate_index_is_measured_and_served(run_dir, tmp_path):
    pytest.importorskip("faiss", reason="FAISS indexes need faiss-cpu (the serve extra)")
    from twotower.serving import Retriever

    manifest = export_run(run_dir, tmp_path / "hnsw", index="hnsw")
    check = manifest["index_recall"]
    assert not check["exact"] and 0.9 <= check["recall"] <= 1.0
    retriever = Retriever.load(tmp_path / "hnsw")
    user = retriever.artifact.queries.column(retriever.artifact.query_key)[0].as_py()
    assert len(retriever.recall_users([user], 5)[0].items) == 5


def test_auto_chooses_the_index_by_corpus_size(run_dir, tmp_path, monkeypatch):
    from twotower.index import choose_index

    assert choose_index("auto", 100) == "exact" and choose_index("flat", 10**9) == "flat"
    assert choose_index("auto", 1_000_000) == "hnsw"
    assert choose_index("auto", 50_000_000) == "ivfpq"
    manifest = export_run(run_dir, tmp_path / "auto", index="auto")
    assert manifest["index"] == "exact" and Artifact.load(tmp_path / "auto").index.kind == "exact"
    monkeypatch.setattr(twotower.index, "AUTO_EXACT_UP_TO", 50)  # this corpus has 100 items
    assert export_run(run_dir, tmp_path / "auto", index="auto")["index"] == "hnsw"
    with pytest.raises(ConfigError, match="choose auto or one of exact, flat, hnsw, ivfpq"):
        export_run(run_dir, tmp_path / "other", index="annoy")


def test_an_as_of_valid_artifact_answers_the_evaluated_rankings(run_dir, tmp_path, served_metrics):
    """Exported as of the end of validation, the artifact's answers to the test users,
    scored against their test items, give exactly ``twotower evaluate``'s test metrics;
    as of everything logged, its users' test items are seen and never answered."""
    from twotower.training.run import evaluate_run

    config, _, _ = load_model(run_dir)
    dataset, split = load_data(config)
    manifest = export_run(run_dir, tmp_path / "valid", as_of="valid")
    assert manifest["as_of"] == "valid"
    expected = evaluate_run(run_dir, ("test",), [1, 5, 10])
    got = served_metrics(tmp_path / "valid", split, dataset, [split.train, split.valid], [1, 5, 10])
    for name, value in got.items():
        assert value == pytest.approx(expected[name], abs=1e-12), name
    export_run(run_dir, tmp_path / "all")
    after = served_metrics(tmp_path / "all", split, dataset, [split.train, split.valid], [10])
    assert after["test/hr@10"] == 0.0  # the test items are seen by then
    with pytest.raises(ConfigError, match=r"unknown as-of 'later'; choose one of valid"):
        export_run(run_dir, tmp_path / "x", as_of="later")


def test_a_refit_run_exports_the_model_whose_test_metrics_it_reports(
    tmp_path, tiny_demo, served_metrics
):
    """With ``training.refit`` the run reports the refit's test metrics; as of the end of
    validation, the exported artifact's answers to the test users score exactly those,
    its manifest says it serves the refit, and ``evaluate_run`` ranks test with it too."""
    from twotower.training.run import evaluate_run

    config = tiny_demo(tmp_path / "data", "training.refit=true", "training.epochs=2")
    run_dir = tmp_path / "run"
    reported = train_run(config, run_dir).metrics
    manifest = export_run(run_dir, tmp_path / "artifact", as_of="valid")
    assert manifest["model"] == "refit"
    dataset, split = load_data(config)
    got = served_metrics(tmp_path / "artifact", split, dataset, [split.train, split.valid], [10])
    for name, value in got.items():
        assert value == pytest.approx(reported[name], abs=1e-12), name
    evaluated = evaluate_run(run_dir, ("test",))
    assert evaluated["test/recall@10"] == pytest.approx(reported["test/recall@10"], abs=1e-12)
    first = load_model(run_dir)[2].state_dict()
    served = Artifact.load(tmp_path / "artifact").query_tower.state_dict()
    assert any(  # the refit is another model than the run's first
        not torch.equal(first[f"query_tower.{name}"], value) for name, value in served.items()
    )
