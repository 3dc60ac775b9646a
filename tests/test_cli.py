"""The command line: it reaches the API and turns user errors into one clear line."""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from twotower.cli import app, main
from twotower.features.pipeline import FeaturePipeline

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


def test_data_synth_writes_a_stream_with_held_out_events(tmp_path):
    result = CliRunner().invoke(
        app, ["data", "synth", "--out", str(tmp_path), "--interactions", "30000", "--items", "800"]
    )
    assert result.exit_code == 0, result.output
    train = pq.read_table(tmp_path / "train")
    valid, test = (pq.read_table(tmp_path / f"{p}.parquet") for p in ("valid", "test"))
    assert 28_000 < train.num_rows + valid.num_rows + test.num_rows < 32_000
    assert {"user_id", "segment", "age", "sessions", "item_id"} <= set(train.column_names)
    users = valid.column("user_id").to_numpy()
    assert len(np.unique(users)) == len(users) == test.num_rows  # one event each
    # the held-out events are each user's last two, in time
    by_user = train.group_by("user_id").aggregate([("timestamp", "max")])
    joined = valid.join(by_user, "user_id")
    assert pc.all(pc.greater_equal(joined["timestamp"], joined["timestamp_max"])).as_py()
    assert pq.read_table(tmp_path / "items.parquet").num_rows == 800


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
    "data: {source: synthetic, synthetic: {num_queries: 80, num_items: 120}}\n"
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


def test_train_init_from_starts_from_an_earlier_run_on_a_new_period(tmp_path, monkeypatch, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(TRAIN_CONFIG)
    earlier, later = tmp_path / "earlier", tmp_path / "later"
    first = ["train", str(config), "--out", str(earlier), "--set", "data.sample_queries=50"]
    result = CliRunner().invoke(app, first)
    assert result.exit_code == 0, result.output
    # every user now, the new period's interactions the training examples
    more = ["train", str(config), "--out", str(later), "--set", "split.train_from=1608000000"]
    result = CliRunner().invoke(app, [*more, "--init-from", str(earlier)])
    assert result.exit_code == 0, result.output
    record = json.loads((later / "init_from.json").read_text())
    assert record["run"] == str(earlier.resolve()) and len(record["sha256"]) == 64
    sizes = [FeaturePipeline.load(run / "features").sizes("query") for run in (earlier, later)]
    assert sizes[1]["user_id"] > sizes[0]["user_id"]  # the users new to it joined

    monkeypatch.setattr("sys.argv", ["twotower", *more, "--init-from", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--init-from {tmp_path / 'nowhere'}: no such folder" in err


def test_set_kind_switches_an_objective_to_that_kinds_defaults(tmp_path):
    from twotower.config import load_config

    config = tmp_path / "c.yaml"
    config.write_text(TRAIN_CONFIG)
    loaded = load_config(config, ["training.objective.kind=hinge", "training.objective.margin=0.2"])
    assert loaded.training.objective.kind == "hinge"
    assert loaded.training.objective.margin == 0.2
    assert loaded.training.objective.num_negatives == 4


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli-run")
    config = folder / "c.yaml"
    config.write_text(TRAIN_CONFIG)
    result = CliRunner().invoke(app, ["train", str(config), "--out", str(folder / "run")])
    assert result.exit_code == 0, result.output
    return folder


def test_evaluate_reproduces_the_runs_metrics_and_honours_options(tiny_run):
    run = tiny_run / "run"
    result = CliRunner().invoke(app, ["evaluate", str(run), "--split", "test", "--k", "5,10"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "evaluation-test.json").read_text())
    trained = json.loads((run / "metrics.json").read_text())
    assert saved["test/ndcg@10"] == pytest.approx(trained["test/ndcg@10"])
    assert "test/recall@5" in saved and not any(k.startswith("valid/") for k in saved)
    kept = CliRunner().invoke(app, ["evaluate", str(run), "--keep-seen", "--split", "valid"])
    assert kept.exit_code == 0, kept.output
    assert (run / "evaluation-valid-keep-seen.json").is_file()


def test_baseline_writes_metrics_for_valid_and_test(tiny_run):
    out = tiny_run / "pop"
    config = tiny_run / "c.yaml"
    result = CliRunner().invoke(app, ["baseline", str(config), "--model", "pop", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"valid/recall@10", "test/recall@10"} <= metrics.keys()
    assert (out / "config.yaml").is_file()
    # by group, as the model's are, and printed as a table
    assert {"test/groups/item:head/ndcg@10", "test/groups/query:few/ndcg@10"} <= metrics.keys()
    assert "test by group" in result.output and "item:tail" in result.output


def test_train_and_evaluate_report_metrics_by_group(tiny_run):
    run = tiny_run / "run"
    trained = json.loads((run / "metrics.json").read_text())
    assert {f"{p}/groups/query:many/recall@10" for p in ("valid", "test")} <= trained.keys()
    epochs = (run / "metrics.jsonl").read_text()
    assert "groups/" not in epochs  # each epoch's validation is not grouped
    result = CliRunner().invoke(app, ["evaluate", str(run), "--split", "test"])
    assert result.exit_code == 0, result.output
    assert "test by group" in result.output and "query:few" in result.output
    saved = json.loads((run / "evaluation-test.json").read_text())
    for key in ("test/groups/item:head/ndcg@10", "test/groups/query:few/recall@10"):
        assert saved[key] == pytest.approx(trained[key])


def test_evaluate_writes_each_users_metrics_and_a_plot_by_group(tiny_run):
    run, baseline = tiny_run / "run", tiny_run / "ease"
    config = tiny_run / "c.yaml"
    ease = ["baseline", str(config), "--model", "ease", "--out", str(baseline)]
    made = CliRunner().invoke(app, ease)
    assert made.exit_code == 0, made.output
    per_user, plot = tiny_run / "users.parquet", tiny_run / "groups.png"
    args = ["evaluate", str(run), "--per-user", str(per_user), "--plot", str(plot)]
    result = CliRunner().invoke(app, [*args, "--compare", str(baseline)])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "evaluation-both.json").read_text())
    users = pq.read_table(per_user)
    assert users.column_names[:5] == ["part", "query_id", "train_count", "group", "held_out"]
    for part in ("valid", "test"):
        rows = users.filter(pc.equal(users["part"], part))
        assert rows.num_rows == saved[f"{part}/queries"]
        mean = pc.mean(rows["ndcg@10"]).as_py()
        assert mean == pytest.approx(saved[f"{part}/ndcg@10"], rel=1e-9)
        assert set(rows["group"].to_pylist()) <= {"few", "some", "many"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = tiny_run / "users.csv"
    only_test = ["evaluate", str(run), "--split", "test", "--per-user", str(csv)]
    again = CliRunner().invoke(app, only_test)
    assert again.exit_code == 0, again.output
    assert csv.read_text().splitlines()[0].startswith('"part","query_id","train_count"')


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "missing.yaml", "--out", "x"], "config file not found: missing.yaml"),
        (["evaluate", "no-such-run"], "no checkpoint 'best'"),
        (["evaluate", "RUN", "--k", "ten"], "--k 'ten'"),
        (["evaluate", "RUN", "--split", "train"], "--split 'train'"),
        (["evaluate", "RUN", "--plot", "p.png", "--plot-metric", "auc"], "--plot-metric 'auc'"),
        (["evaluate", "RUN", "--plot", "p.png", "--compare", "nowhere"], "--compare nowhere"),
        (["baseline", "CONFIG", "--model", "bpr", "--out", "x"], "--model 'bpr'"),
        (["train", "CONFIG", "--out", "x", "--set", "training.epochs=many"], "expected int"),
        (["train", "CONFIG", "--out", "x", "--set", "training.epoch=2"], "did you mean 'epochs'"),
    ],
)
def test_user_errors_name_what_is_wrong(args, message, tiny_run, monkeypatch, capsys):
    args = [
        str(tiny_run / "run") if a == "RUN" else str(tiny_run / "c.yaml") if a == "CONFIG" else a
        for a in args
    ]
    monkeypatch.chdir(tiny_run)
    monkeypatch.setattr("sys.argv", ["twotower", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_debug_shows_the_exception_itself(tiny_run, monkeypatch):
    monkeypatch.setattr("sys.argv", ["twotower", "evaluate", "no-such-run", "--debug"])
    monkeypatch.chdir(tiny_run)
    from twotower.errors import DataError

    with pytest.raises(DataError):
        main()


def test_export_then_recall_prints_json_lines(tiny_run, monkeypatch, capsys):
    artifact, vectors = tiny_run / "artifact", tiny_run / "vectors.parquet"
    command = ["export", str(tiny_run / "run"), "--out", str(artifact)]
    result = CliRunner().invoke(app, [*command, "--query-vectors", str(vectors)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert pq.read_metadata(vectors).num_rows == manifest["num_queries"] > 0
    assert f"Wrote {manifest['num_queries']} query vectors" in result.output
    users = tiny_run / "users.txt"
    users.write_text("1\n3\n\n")  # the synthetic users are numbered from 1; blank lines skipped
    result = CliRunner().invoke(
        app, ["recall", str(artifact), "--users-file", str(users), "-k", "4"]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [line["query"] for line in lines] == [1, 3]  # the stored (integer) keys
    assert all(len(line["items"]) == len(line["scores"]) == 4 for line in lines)
    assert all(line["scores"] == sorted(line["scores"], reverse=True) for line in lines)
    assert all("interests" not in line for line in lines)  # a single-vector model

    monkeypatch.setattr("sys.argv", ["twotower", "recall", str(artifact), "--user", "nobody"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "unknown query id(s): 'nobody'" in capsys.readouterr().err


def test_recall_from_a_multi_interest_artifact_names_each_items_interest(interests_artifact):
    from twotower.serving import Retriever

    folder, oracle = interests_artifact
    users = [str(u) for u in oracle.query_ids[:3]]
    result = CliRunner().invoke(app, ["recall", str(folder), "--user", users[1], "-k", "6"])
    assert result.exit_code == 0, result.output
    (line,) = [json.loads(text) for text in result.output.splitlines()]
    (expected,) = Retriever.load(folder).recall_users([oracle.query_ids[1]], 6)
    assert line["items"] == expected.items and line["interests"] == expected.interests


def test_recall_needs_exactly_one_kind_of_query(tiny_run):
    result = CliRunner().invoke(app, ["recall", str(tiny_run), "--user", "1", "--query", "x"])
    assert result.exit_code != 0
    assert "exactly one of --user, --users-file or --query" in str(result.exception)


def test_data_dir_points_a_movielens_config_at_another_folder(tmp_path):
    from twotower.data.config import DataConfig
    from twotower.data.load import with_data_dir
    from twotower.errors import ConfigError

    moved = with_data_dir(DataConfig(source="movielens-1m", path=Path("old")), tmp_path)
    assert moved.path == tmp_path / "ml-1m"
    with pytest.raises(ConfigError, match="data.source is 'synthetic'"):
        with_data_dir(DataConfig(source="synthetic"), tmp_path)


DATASETS = ROOT.parent / "shared" / "datasets"


@pytest.mark.skipif(
    not (DATASETS / "ml-100k").is_dir(),
    reason=f"MovieLens-100K not found at {DATASETS}; it lives in ../shared/datasets",
)
def test_prepare_reads_movielens_from_data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["data", "prepare", str(ROOT / "configs" / "ml100k.yaml"), "--out", "features"]
    nowhere = ["--set", "data.path=nowhere"]  # --data-dir must win over the config's path
    result = CliRunner().invoke(app, [*args, *nowhere, "--data-dir", str(DATASETS)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["interactions"] == 100_000


def test_data_build_writes_the_parts_and_refuses_a_foreign_folder(tmp_path):
    pytest.importorskip("duckdb")
    rows = ["u,i,t"] + [f"{q},{(q * 7 + k) % 30},{k}" for q in range(40) for k in range(6)]
    (tmp_path / "log.csv").write_text("\n".join(rows) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text(
        "data: {source: files, interactions: {path: log.csv, query_id: u, item_id: i, "
        "timestamp: t}}\nsplit: {method: leave_last_out}\n"
    )
    out = tmp_path / "built"
    command = ["data", "build", str(config), "--out", str(out), "--rows-per-part", "100"]
    result = CliRunner().invoke(app, [*command, "--row-group-rows", "50"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == {"train": 160, "valid": 40, "test": 40}
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    result = CliRunner().invoke(app, [*command[:4], str(tmp_path)])
    assert result.exit_code != 0
    assert "is not a data build (no manifest.json); refusing to replace it" in str(result.exception)
