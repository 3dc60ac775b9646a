"""The demo end to end on a small synthetic set: files written, metrics sane."""

import json
from pathlib import Path

import pytest

from twotower.config import load_config
from twotower.demo import (
    NEW_ITEMS_DIR,
    NEW_ITEMS_DROPOUT,
    format_new_items,
    format_table,
    run_demo,
)
from twotower.export import export_run
from twotower.features.specs import IdFeature
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


def test_demo_runs_again_with_new_items_held_out(result):
    """The second run holds a tenth of the 200 items out of training: the model ranks
    them from their features, every baseline is ranked on them and scores 0."""
    items, pairs = result.held_out
    assert items == 20 and pairs > 0
    saved = json.loads((result.out / NEW_ITEMS_DIR / "metrics.json").read_text())
    assert saved == result.new_items and set(saved) == set(result.metrics)
    for name, metrics in result.new_items.items():
        assert metrics["test/new_items/queries"] > 0, name
        if name != "two-tower":
            assert metrics["test/new_items/recall@100"] == 0.0, name
    assert result.new_items["two-tower"]["test/new_items/recall@50"] > 0.0
    assert (result.out / NEW_ITEMS_DIR / "two-tower" / "metrics.json").is_file()


def test_the_new_items_run_drops_item_ids_and_the_first_does_not(result):
    def item_id(run: Path) -> IdFeature:
        config = load_config(run / "config.yaml")
        return next(spec for spec in config.features.item if spec.name == "item_id")

    assert item_id(result.out / NEW_ITEMS_DIR / "two-tower").dropout == NEW_ITEMS_DROPOUT > 0
    assert item_id(result.out / "two-tower").dropout == 0.0
    assert result.dropout == {"item_id": NEW_ITEMS_DROPOUT}


def test_the_new_items_table_says_what_it_shows(result):
    table = format_new_items(result)
    words = " ".join(table.split())  # the title is wrapped
    assert "20 items held out of training" in words
    assert "score every new item 0" in words
    assert f"(item_id dropout {NEW_ITEMS_DROPOUT:g})" in words
    rows = table.splitlines()[-len(result.new_items) :]
    assert [row.split()[0] for row in rows] == list(result.new_items)
    assert rows[-1].split()[1:] == ["0.0000"] * 5  # ease


def test_the_demo_command_prints_both_tables(tmp_path):
    from typer.testing import CliRunner

    from twotower.cli import app

    tiny = [
        "data.synthetic.num_queries=60",
        "data.synthetic.num_items=40",
        "data.synthetic.interactions_per_query=6",
        "training.epochs=1",
    ]
    command = ["demo", "--out", str(tmp_path / "demo")]
    printed = CliRunner().invoke(app, [*command, *(a for o in tiny for a in ("--set", o))])
    assert printed.exit_code == 0, printed.output
    first, second = printed.output.split("New items:")
    words = " ".join(second.split())  # the title is wrapped
    assert "Full-corpus ranking, seen items excluded" in first
    assert "4 items held out of training" in words
    assert "The two-tower model can place an item it never trained on" in words
    rows = {line.split()[0]: line.split()[1:] for line in second.splitlines()[-6:-2]}
    # at 10 (of 40 items), the baselines retrieve no new item; a list of 50 holds them all
    for name in ("pop", "itemknn", "ease"):
        assert rows[name][:4] == ["0.0000"] * 4, second


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
