"""The demo end to end on a small synthetic set: files written, metrics sane."""

import json
from pathlib import Path

import pytest

from twotower.demo import format_table, run_demo
from twotower.export import export_run
from twotower.training.run import evaluate_run

SMALL = [
    "data.synthetic.num_queries=300",
    "data.synthetic.num_items=200",
    "data.synthetic.interactions_per_query=12",
]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo"), SMALL)


def test_demo_writes_its_run_folder(result):
    run = "two-tower/"
    for name in ("config.yaml", "metrics.json", "recall_at_k.png", run + "features/features.json"):
        assert (result.out / name).is_file(), name
    saved = json.loads((result.out / "metrics.json").read_text())
    assert saved == result.metrics


def test_demo_metrics_are_consistent(result):
    for name, metrics in result.metrics.items():
        assert metrics["test/queries"] == 300, name
        recalls = [metrics[f"test/recall@{k}"] for k in (1, 2, 5, 10, 20, 50, 100)]
        assert recalls == sorted(recalls), f"{name}: recall@K must not fall as K grows"
        # One held-out item per user (leave-last-out): recall equals hit rate.
        assert metrics["test/recall@10"] == pytest.approx(metrics["test/hr@10"])


def test_personalized_models_beat_popularity_on_planted_clusters(result):
    pop = result.metrics["pop"]["test/recall@50"]
    assert result.metrics["two-tower"]["test/recall@50"] > pop
    assert result.metrics["ease"]["test/recall@50"] > pop
    assert result.metrics["itemknn"]["test/recall@50"] > pop


def test_format_table_has_a_row_per_model(result):
    table = format_table(result.metrics, ["test/recall@10"])
    lines = table.splitlines()
    assert len(lines) == 2 + len(result.metrics)
    assert f"{result.metrics['ease']['test/recall@10']:.4f}" in table


def test_the_demo_run_is_evaluated_and_exported_from_another_folder(tmp_path, monkeypatch):
    """``twotower demo --out runs/demo`` names a relative folder; its run's saved config
    still finds the data once the working directory changes."""
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    tiny = [
        "data.synthetic.num_queries=60",
        "data.synthetic.num_items=40",
        "data.synthetic.interactions_per_query=6",
        "training.epochs=1",
    ]
    run_demo(Path("runs") / "demo", tiny)
    monkeypatch.chdir(tmp_path / "elsewhere")
    run = tmp_path / "here" / "runs" / "demo" / "two-tower"
    metrics = evaluate_run(run, parts=("test",), ks=[10])
    assert metrics["test/queries"] == 60
    manifest = export_run(run, Path("artifact"))
    assert (tmp_path / "elsewhere" / "artifact" / "manifest.json").is_file()
    assert Path(manifest["config"]["data"]["interactions"]["path"]).is_absolute()
