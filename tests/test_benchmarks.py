"""The benchmark suites run end to end in their quick modes (on the real MovieLens data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ROOT.parent / "shared" / "datasets"


def run_quick(script: str, out: Path, *options: str) -> None:
    """Runs ``benchmarks/<script> --quick`` into ``out``; fails with its error output."""
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", f"--out={out}"]
    done = subprocess.run([*command, *options], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(
    not (DATASETS / "ml-100k").is_dir(),
    reason="MovieLens-100K is not in ../shared/datasets beside the repository",
)
def test_quality_quick_writes_its_tables_and_plot(tmp_path):
    run_quick("quality.py", tmp_path, "--datasets=ml100k", "--objectives=in_batch,listwise")
    result = json.loads((tmp_path / "quality.json").read_text())["ml100k"]
    rows = result["rows"]
    assert list(rows) == ["pop", "itemknn", "ease", "in_batch (mlp)", "listwise (mlp)"]
    for row in rows.values():
        for metric in ("test/hr@10", "test/ndcg@10", "test/hr@50"):
            mean, spread = row[metric]
            assert 0.0 <= mean <= 1.0 and spread == 0.0
        assert row["test/hr@10"][0] <= row["test/hr@50"][0]
    assert rows["ease"]["test/hr@10"][0] > rows["pop"]["test/hr@10"][0]
    assert "| ease |" in (tmp_path / "quality.md").read_text()
    assert (tmp_path / "quality-ml100k.png").stat().st_size > 1000
    assert (tmp_path / "ml100k-quick" / "in_batch-mlp-s0" / "metrics.json").is_file()


@pytest.mark.skipif(
    not (DATASETS / "ml-1m").is_dir(),
    reason="MovieLens-1M is not in ../shared/datasets beside the repository",
)
def test_training_quick_measures_speed_memory_and_the_reference_ratio(tmp_path):
    run_quick("training.py", tmp_path, "--objectives=in_batch", "--ceiling-seconds=0.5")
    result = json.loads((tmp_path / "training.json").read_text())
    (row,) = result["objectives"]
    assert row["objective"] == "in_batch" and row["eval_users"] > 0
    assert row["examples_per_s"] > 0 and row["epoch_seconds"] > 0 and row["peak_rss_mib"] > 100
    assert row["ceiling_steps"] >= 2 and 0 < row["build_share"] < 1
    assert row["ceiling_ratio"] == pytest.approx(row["pipeline_per_s"] / row["ceiling_per_s"])
    reference = result["reference"]
    assert reference["steps"] == 20
    assert reference["ratio"] == pytest.approx(
        reference["ours_per_s"] / reference["reference_per_s"]
    )
    assert "plain reference loop" in (tmp_path / "training.md").read_text()


@pytest.fixture(scope="module")
def load_out(tmp_path_factory) -> Path:
    """One --out for the load runs: the artifact is built once and reused."""
    return tmp_path_factory.mktemp("load")


@pytest.mark.parametrize("state", ["memory", "redis"])
def test_load_quick_serves_every_request_and_event_through_reloads(load_out, state, request):
    options = ["--events-per-second=20"]
    if state == "redis":
        options.append(f"--state={request.getfixturevalue('redis_server').url}")
    run_quick("load.py", load_out, *options)
    result = json.loads((load_out / "load.json").read_text())
    summary = result["summary"]
    assert result["service_alive_at_end"] and result["events_per_second"] == 20
    assert summary["requests"] > 100 and summary["errors"] == 0
    assert summary["reloads"] >= 3 and summary["reload_results"] == [200] * summary["reloads"]
    assert len(summary["series"]) == 6  # one window per second of --quick's 6 s
    assert sum(w["requests"] for w in summary["series"]) == summary["requests"]
    assert summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    # 20 a second on a schedule over 6 s: every one acknowledged, through the reloads
    assert 100 <= summary["events"] == summary["events_acknowledged"]
    assert summary["events_failed"] == 0
    assert sum(w["events"] for w in summary["series"]) == summary["events"]
    table = (load_out / "load.md").read_text()
    assert "| requests | errors |" in table and "events: acknowledged / failed" in table
    assert f"users' states in {'memory' if state == 'memory' else 'redis://'}" in table
    assert (load_out / "load.png").stat().st_size > 1000


def test_build_quick_measures_time_and_memory_per_engine(tmp_path):
    pytest.importorskip("duckdb")
    run_quick("build.py", tmp_path, "--engines=duckdb", "--sizes=ignored")
    result = json.loads((tmp_path / "build.json").read_text())
    assert [(r["engine"], r["rows"]) for r in result] == [
        ("duckdb", 100_000),
        ("duckdb", 1_000_000),
    ]
    for row in result:
        assert sum(row["parts"].values()) == row["rows"]
        assert row["seconds"] > 0 and row["peak_mib"] > 50
    assert (tmp_path / "build.png").stat().st_size > 0


def test_quality_ledger_refuses_an_entry_from_another_recipe(tmp_path):
    """A ledger entry is read back only for the recipe it was trained from: the digest
    ignores the thread count and the data folder, and changes with the learning rate."""
    from twotower.config import save_config

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    config = quality.base_config("ml100k", None, quick=True, threads=1)
    digest = quality.recipe_digest(config)
    assert quality.recipe_digest(quality.apply_overrides(config, ["threads=2"])) == digest
    moved = quality.apply_overrides(config, ["data.path=/elsewhere/ml-100k"])
    assert quality.recipe_digest(moved) == digest
    assert quality.recipe_digest(quality.apply_overrides(config, ["training.lr=0.5"])) != digest

    run = quality.apply_overrides(config, [*quality.VARIANTS["mlp"], "seed=0"])
    run = quality.apply_overrides(
        run, [f"training.objective.{s}" for s in quality.OBJECTIVES["in_batch"]]
    )
    entry = tmp_path / "ledger" / "ml100k" / "in_batch-mlp-s0.json"
    entry.parent.mkdir(parents=True)
    entry.write_text(json.dumps({"test/hr@10": 0.5, "recipe": quality.recipe_digest(run)}))
    ledger, out = entry.parents[1], tmp_path / "ml100k"
    read = quality.run_two_tower(config, "in_batch", "mlp", 0, out, ledger)
    assert read["test/hr@10"] == 0.5

    entry.write_text(json.dumps({"test/hr@10": 0.5, "recipe": "0" * 16}))
    with pytest.raises(SystemExit, match="in_batch-mlp-s0.json: this ledger entry"):
        quality.run_two_tower(config, "in_batch", "mlp", 0, out, ledger)

    # a finished run folder is checked by the config it saved, the same way
    entry.unlink()
    folder = out / "in_batch-mlp-s0"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"test/hr@10": 0.25}))
    save_config(run, folder / "config.yaml")
    assert quality.run_two_tower(config, "in_batch", "mlp", 0, out, None)["test/hr@10"] == 0.25
    other = quality.apply_overrides(run, ["training.lr=0.5"])
    save_config(other, folder / "config.yaml")
    with pytest.raises(SystemExit, match="in_batch-mlp-s0: this finished run"):
        quality.run_two_tower(config, "in_batch", "mlp", 0, out, None)


@pytest.mark.skipif(
    not (DATASETS / "ml-latest-small").is_dir(),
    reason="MovieLens latest-small is not in ../shared/datasets beside the repository",
)
def test_search_levers_keep_validation_only_and_never_train_a_recorded_run_again(tmp_path):
    ledger = tmp_path / "levers.jsonl"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "search_levers.py"),
        f"--ledger={ledger}",
        f"--out={tmp_path / 'runs'}",
        "--levers=base,history",
        "--seeds=0",
        "--set=training.epochs=1",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [(e["lever"], e["seed"], e["best_epoch"]) for e in entries] == [
        ("base", 0, 1),
        ("history", 0, 1),
    ]
    history = entries[1]
    assert history["query"][0]["kind"] == "history" and history["item"][0]["name"] == "item_id"
    assert history["also_set"] == ["training.epochs=1"]
    for entry in entries:
        metrics = [key for key in entry if "@" in key]
        assert metrics and all(key.startswith("valid/") for key in metrics)
        assert 0.0 < entry["valid/recall@10"] <= entry["valid/recall@100"] <= 1.0
    assert "test" not in done.stdout.lower()
    assert (tmp_path / "levers.png").stat().st_size > 1000

    again = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert ledger.read_text().splitlines() == [json.dumps(e) for e in entries]
    assert "valid recall@10" not in again.stdout
