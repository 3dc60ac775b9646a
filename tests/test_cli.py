"""The command line: it reaches the API and turns user errors into one clear line."""

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from twotower.cli import app, main

ROOT = Path(__file__).resolve().parents[1]


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python3 -m venv .*$", readme, flags=re.M)
    assert len(commands) == 2, "the README must open with the two set-up commands"
    assert "twotower demo" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_data_synth_writes_three_parquet_tables(tmp_path):
    result = CliRunner().invoke(
        app, ["data", "synth", "--out", str(tmp_path), "--queries", "50", "--items", "40"]
    )
    assert result.exit_code == 0, result.output
    users = pq.read_table(tmp_path / "users.parquet")
    assert users.num_rows == 50
    assert pq.read_table(tmp_path / "items.parquet").num_rows == 40


def test_data_prepare_reports_counts_and_saves_features(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "data: {source: synthetic, synthetic: {num_queries: 60, num_items: 50}}\n"
        "features:\n"
        "  query: [{name: user_id, kind: id, column: user_id}]\n"
        "  item: [{name: item_id, kind: id, column: item_id}]\n"
    )
    result = CliRunner().invoke(app, ["data", "prepare", str(config), "--out", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["queries"] == 60
    assert summary["train"] + summary["valid"] + summary["test"] == summary["interactions"]
    assert (tmp_path / "f" / "features.npz").is_file()


def test_user_errors_print_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("split: {methd: random}\n")
    monkeypatch.setattr("sys.argv", ["twotower", "data", "prepare", str(config), "--out", "x"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "did you mean 'method'" in err
    assert "Traceback" not in err


TRAIN_CONFIG = (
    "data: {source: synthetic, synthetic: {num_queries: 80, num_items: 40}}\n"
    "features:\n"
    "  query: [{name: user_id, kind: id, column: user_id}]\n"
    "  item: [{name: item_id, kind: id, column: item_id}]\n"
    "model: {query: {kind: mlp, widths: [8]}, item: {kind: mlp, widths: [8]}}\n"
    "training: {epochs: 1, batch_size: 64, tensorboard: false, ks: [10]}\n"
)


def test_train_writes_a_run_and_resume_refuses_a_changed_model(tmp_path, monkeypatch, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(TRAIN_CONFIG)
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(config), "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "ndcg@10" in result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_epoch"] == 1
    assert "epoch 1" in (run / "train.log").read_text()

    more = ["train", str(config), "--out", str(run), "--resume", "--set", "training.epochs=2"]
    result = CliRunner().invoke(app, more)
    assert result.exit_code == 0, result.output
    records = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in records] == [1, 2]

    changed = [*more, "--set", "model.temperature=0.1"]
    monkeypatch.setattr("sys.argv", ["twotower", *changed])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "model.temperature" in err


def test_set_kind_switches_an_objective_to_that_kinds_defaults(tmp_path):
    from twotower.config import load_config

    config = tmp_path / "c.yaml"
    config.write_text(TRAIN_CONFIG)
    loaded = load_config(config, ["training.objective.kind=hinge", "training.objective.margin=0.2"])
    assert loaded.training.objective.kind == "hinge"
    assert loaded.training.objective.margin == 0.2
    assert loaded.training.objective.num_negatives == 4
