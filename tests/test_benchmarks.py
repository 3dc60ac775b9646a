"""The benchmark suites run end to end in their quick modes (on the real MovieLens data);
the freshness replay's steps on a tiny synthetic log, against oracles."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
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


@pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is not installed (Debian: apt-get install redis-server)",
)
def test_state_scale_quick_serves_the_same_users_from_redis_and_from_memory(tmp_path):
    # without wrk (the open-loop client) the requests at fixed rates are left out
    wrk = shutil.which("wrk") is not None
    run_quick("state_scale.py", tmp_path, "--sizes=20000", *([] if wrk else ["--rates="]))
    result = json.loads((tmp_path / "state-scale.json").read_text())
    (size,) = result["sizes"]
    users = size["users"]
    assert users == 1000 and size["redis_load"]["users"] == users
    assert size["redis_load"]["keys"] >= 2 * users  # each user's features and tag, at least
    assert size["redis_load"]["used_memory_mib"] >= 1
    assert size["answers_agree"]
    for store in ("memory", "redis"):
        (start,) = size[store]["starts"]
        assert start["seconds"] > 0 and start["rss_mib"] >= start["anon_mib"] > 50
        assert size[store]["after_requests"]["rss_mib"] > 50
    assert all(size["store_reads"][f"read_{n}_ms"] > 0 for n in (1, 16, 64, 256))
    runs = size.get("open_loop", [])
    assert sorted(r["store"] for r in runs) == (["memory", "redis"] if wrk else [])
    for run in runs:
        assert run["offered_per_s"] == 50 and run["non_2xx"] + run["socket_errors"] == 0
        assert run["p50_ms"] <= run["p90_ms"] <= run["p99_ms"] and run["batch_ms"] > 0
    assert len(size["medians"]["latency"]) == (1 if wrk else 0)
    assert "| 1,000 |" in (tmp_path / "state-scale.md").read_text()
    assert (tmp_path / "state-scale.png").stat().st_size > 1000


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
    assert "nothing new" in again.stdout  # and EASE is not fitted again for the figure


def _freshness():
    """The replay benchmark's module (``benchmarks/freshness.py``)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import freshness

    return freshness


@pytest.fixture(scope="module")
def freshness_cut(tiny_demo, tmp_path_factory):
    """(cut, artifact folder): the tiny demo's log, its first ten users' events moved
    into its last eighth of time (new at export), cut at its 80% time; the part before
    trained (with time-gap buckets) and exported by the benchmark's own steps."""
    from twotower.data.synthetic import generate

    freshness = _freshness()
    folder = tmp_path_factory.mktemp("freshness")
    history = "features.query.history"
    config = tiny_demo(
        folder / "demo",
        f"{history}.encoder=attention",
        f"{history}.time_buckets=8",
        f"{history}.time_unit=3600",
    )
    dataset = generate(config.data.synthetic).dataset
    stamps = dataset.column("timestamp")
    late = dataset.column("query_idx") < 10
    moved = np.where(late, stamps.max() - (stamps.max() - stamps) // 8, stamps)  # last 1/8
    log = dataset.interactions.set_column(
        dataset.interactions.column_names.index("timestamp"), "timestamp", pa.array(moved)
    )
    cut = freshness.cut_log(dataclasses.replace(dataset, interactions=log), 0.8)
    config = dataclasses.replace(config, data=freshness.export_data(cut, folder / "data"))
    chosen = freshness.export_chosen(config, {"base": []}, folder)
    assert chosen["chosen"] == "base" and "valid/ndcg@10" in chosen["candidates"]["base"]
    return cut, folder / "artifact"


@pytest.fixture(scope="module")
def freshness_replayed(freshness_cut):
    """The first two thirds of the tiny cut's events replayed: a namespace of the cut,
    the artifact, the new users' rows, the events, the replayer and what it replayed."""
    from types import SimpleNamespace

    from twotower.serving import Retriever
    from twotower.serving.artifact import Artifact

    freshness = _freshness()
    cut, folder = freshness_cut
    artifact = Artifact.load(folder)
    live, frozen = Retriever(artifact), Retriever(artifact)
    rows = freshness.new_user_rows(cut, live.query_columns)
    part = cut.replay.slice(0, 2 * len(cut.replay) // 3)
    replayer = freshness.Replayer(live, frozen, rows)
    replayed = freshness.replay(replayer, part)
    return SimpleNamespace(
        cut=cut, artifact=artifact, rows=rows, part=part, replayer=replayer, replayed=replayed
    )


def test_freshness_live_store_holds_each_users_latest_events_of_the_log_so_far(
    freshness_replayed,
):
    from twotower.features.history import RecentLists

    run = freshness_replayed
    cut, part, live = run.cut, run.part, run.replayer.live
    users = np.concatenate([cut.before.column("query_id").to_numpy(), part.users])
    items = np.concatenate([cut.before.column("item_id").to_numpy(), part.items])
    stamps = np.concatenate([cut.before.column("timestamp").to_numpy(), part.timestamps])
    keys, owner = np.unique(users, return_inverse=True)
    width = run.artifact.pipeline.recent_length
    expected = RecentLists.from_log(owner, items, stamps.astype(float), len(keys), width)
    states = live.store.read(keys.tolist())
    for q in range(len(keys)):
        span = slice(expected.indptr[q], expected.indptr[q + 1])
        pairs = zip(expected.rows[span].tolist(), expected.times[span].tolist(), strict=True)
        assert states.recent[q] == list(pairs), keys[q]
    assert live.store.changed(part.users.tolist()).all()


def test_freshness_frozen_arm_answers_as_exported(freshness_replayed):
    from twotower.serving import Retriever
    from twotower.serving.query import Query

    frozen = freshness_replayed.replayer.frozen
    known = sorted(set(freshness_replayed.cut.before.column("query_id").to_pylist()))
    rows = freshness_replayed.rows
    assert len(rows) == 10 and not set(rows) & set(known)
    assert not frozen.store.changed(known).any()
    queries = [Query(user=u) for u in known] + [Query(features=row) for row in rows.values()]
    exported = Retriever(freshness_replayed.artifact).retrieve(queries)
    assert [r.items for r in frozen.retrieve(queries)] == [r.items for r in exported]


def test_freshness_runs_of_distinct_users_answer_as_one_event_at_a_time(
    freshness_replayed, tmp_path
):
    from twotower.serving import Retriever

    freshness, run = _freshness(), freshness_replayed
    part, replayed = run.part, run.replayed
    one_by_one = freshness.Replayer(Retriever(run.artifact), Retriever(run.artifact), run.rows)
    for position in range(len(part)):
        event = part.slice(position, position + 1)
        for arm, (rank,) in one_by_one.recall(event).items():
            assert rank == replayed.ranks[arm][position], (arm, position)
        one_by_one.ingest(event)
    assert replayed.known.any() and (~replayed.known).any()
    first = replayed.earlier == 0  # no replayed event yet: every arm reads one state
    for arm in freshness.ARMS:
        assert (replayed.ranks[arm][first] == replayed.ranks["live"][first]).all()

    result = freshness.summary(replayed, draws=200)
    assert result["overall"]["all"]["events"] == len(part)
    assert "| new since export |" in freshness.markdown(result)
    freshness.plot(result, tmp_path / "freshness.png")
    assert (tmp_path / "freshness.png").stat().st_size > 1000


def test_freshness_hit_rate_and_ndcg_by_hand(freshness_cut):
    """Three events of three known users, their items placed by hand: first, third and
    outside the top 10: HR@10 = 2/3, NDCG@10 = (1 + 1/log2(4) + 0) / 3 = 0.5."""
    from twotower.serving import Retriever
    from twotower.serving.artifact import Artifact
    from twotower.serving.query import Query

    freshness = _freshness()
    cut, folder = freshness_cut
    artifact = Artifact.load(folder)
    live, frozen = Retriever(artifact), Retriever(artifact)
    users = sorted(set(cut.before.column("query_id").to_pylist()))[:3]
    everything = live.retrieve([Query(user=u, k=artifact.index.num_items) for u in users])
    items = [everything[0].items[0], everything[1].items[2], everything[2].items[10]]
    events = freshness.Events(np.array(users), np.array(items), np.array([1e10] * 3))
    replayed = freshness.replay(freshness.Replayer(live, frozen, {}), events)
    for arm in freshness.ARMS:
        assert replayed.ranks[arm].tolist() == [0, 2, -1]
    scores = freshness.summary(replayed, draws=10)["overall"]["all"]
    assert scores["events"] == 3 and scores["users"] == 3
    for arm in freshness.ARMS:
        assert scores[arm] == {"hr@10": pytest.approx(2 / 3), "ndcg@10": pytest.approx(0.5)}
    assert freshness.distinct_runs(np.array([5, 6, 5, 7, 7])) == [(0, 2), (2, 4), (4, 5)]
    assert freshness.earlier_events(np.array([5, 6, 5, 5, 6])).tolist() == [0, 0, 1, 2, 1]


SPLITS = ("train", "valid", "test")


def _update_replay():
    """The update replay benchmark's module (``benchmarks/update_replay.py``)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import update_replay

    return update_replay


@pytest.mark.skipif(
    not (DATASETS / "ml-100k").is_dir(),
    reason="MovieLens-100K is not in ../shared/datasets beside the repository",
)
def test_update_replay_quick_writes_its_ledger_table_and_plot(tmp_path):
    run_quick("update_replay.py", tmp_path)
    entries = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    arms = [a for a in _update_replay().ARMS if _update_replay().WARM_START or a != "incremental"]
    assert [(e["arm"], e["step"]) for e in entries] == [("initial", 0)] + [
        (arm, step) for step in (1, 2) for arm in arms
    ]
    assert all(0 < e["recall@10"] <= 1 and e["users"] > 100 for e in entries)
    assert "| 2 |" in (tmp_path / "update-replay-ml100k.md").read_text()
    assert (tmp_path / "update-replay-ml100k.png").stat().st_size > 1000


def test_update_replay_steps_cut_the_log_into_equal_periods_by_time():
    """1,000 distinct timestamps in shuffled order: the first 60% is the initial data,
    then 4 periods of 100; each validation window is the last 50 before a step's end,
    and an incremental update trains from the previous window on."""
    steps = _update_replay().replay_steps(
        np.random.default_rng(0).permutation(1000) * 10.0 + 5, 0.6, 4, 0.5
    )
    times = np.arange(1000) * 10.0 + 5  # the log in time order
    assert [s.index for s in steps] == [0, 1, 2, 3]
    for step in steps:
        known = 600 + 100 * step.index
        assert step.known_until == times[known]
        assert (times < step.valid_from).sum() == known - 50
        assert ((times >= step.known_until) & (times < step.next_until)).sum() == 100
    assert steps[-1].next_until > times[-1]
    assert [s.next_until for s in steps[:-1]] == [s.known_until for s in steps[1:]]
    assert steps[0].new_from is None
    assert [s.new_from for s in steps[1:]] == [s.valid_from for s in steps[:-1]]
    with pytest.raises(ValueError, match="too few"):
        _update_replay().replay_steps(np.arange(4.0), 0.5, 4, 0.5)


def test_update_replay_seconds_come_from_a_ledger_timed_alone():
    """The timing ledger's mean seconds replace each (arm, step)'s; a line of other
    quality, or an (arm, step) it lacks, is refused."""
    retimed = _update_replay().retimed

    def line(arm, step, seed, recall, seconds):
        keys = {"arm": arm, "step": step, "seed": seed}
        return keys | {"recall@10": recall, "ndcg@10": recall / 2, "seconds": seconds}

    ledger = [line("full", 1, 0, 0.1, 90.0), line("full", 1, 1, 0.2, 110.0)]
    ledger += [line("none", 1, 0, 0.05, 0.0)]
    timing = [line("full", 1, 0, 0.1, 40.0), line("full", 1, 2, 0.3, 60.0)]
    timing += [line("none", 1, 0, 0.05, 0.0)]
    assert [e["seconds"] for e in retimed(ledger, timing)] == [50.0, 50.0, 0.0]
    assert [e["recall@10"] for e in retimed(ledger, timing)] == [0.1, 0.2, 0.05]
    with pytest.raises(ValueError, match=r"\('full', 1, 0\) has other metrics"):
        retimed(ledger, [line("full", 1, 0, 0.11, 40.0), timing[2]])
    with pytest.raises(ValueError, match=r"no timing for \(arm, step\) \[\('none', 1\)\]"):
        retimed(ledger, timing[:2])


@pytest.fixture(scope="module")
def update_replayed(tiny_demo, tmp_path_factory):
    """The tiny demo's log replayed from its first half in 2 periods, arms none and full
    (and incremental where training can start from a run), seed 0: a namespace of the
    module, the dataset, the steps, their configs, the runs, the ledger and the setup."""
    from types import SimpleNamespace

    from twotower.data.synthetic import generate

    update_replay = _update_replay()
    folder = tmp_path_factory.mktemp("update-replay")
    base = tiny_demo(folder / "demo")
    dataset = generate(base.data.synthetic).dataset
    steps = update_replay.replay_steps(dataset.column("timestamp"), 0.5, 2, 0.5)
    configs = [
        update_replay.step_config(
            base, step, update_replay.write_step_data(dataset, step, folder / f"data-{step.index}")
        )
        for step in steps
    ]
    runs = update_replay.Replay(steps, configs, folder / "runs", incremental_epochs=1)
    arms = [a for a in update_replay.ARMS if update_replay.WARM_START or a != "incremental"]
    ledger, setup = folder / "ledger.jsonl", {"recipe": "tiny"}
    update_replay.replay(runs, arms, [0], ledger, setup)
    return SimpleNamespace(
        module=update_replay, dataset=dataset, steps=steps, configs=configs, runs=runs,
        arms=arms, ledger=ledger, setup=setup,
    )  # fmt: skip


def test_update_replay_step_scores_the_next_period_with_everything_before_it_known(
    update_replayed,
):
    from twotower.sources import MemorySource

    run = update_replayed
    stamps = run.dataset.column("timestamp")
    for step, config in zip(run.steps, run.configs, strict=True):
        split = MemorySource.read(config).split
        parts = {name: split.part(name).column("timestamp").to_numpy() for name in SPLITS}
        assert (parts["train"] < step.valid_from).all()
        assert ((parts["valid"] >= step.valid_from) & (parts["valid"] < step.known_until)).all()
        next_period = (stamps >= step.known_until) & (stamps < step.next_until)
        assert np.array_equal(np.sort(parts["test"]), np.sort(stamps[next_period]))
        assert sum(len(p) for p in parts.values()) == (stamps < step.next_until).sum()


def test_update_replay_arms_score_their_own_runs_on_the_next_period(update_replayed):
    """A trained arm's line is its run's own test metrics (the run's split is the step's);
    no update scores the initial model with the step's histories and seen items."""
    from twotower.config import load_config

    run = update_replayed
    entries = [json.loads(line) for line in run.ledger.read_text().splitlines()]
    assert [(e["arm"], e["step"]) for e in entries] == [("initial", 0)] + [
        (arm, 1) for arm in run.arms
    ]
    folders = run.runs.out / "seed-0"
    for entry in entries:
        if entry["arm"] == "none":
            assert entry["seconds"] == 0 and entry["epochs"] == 0
            expected = run.module.next_period(folders / "initial-0", run.configs[1])
            assert {k: entry[k] for k in expected} == expected
            continue
        metrics = json.loads(
            (folders / f"{entry['arm']}-{entry['step']}" / "metrics.json").read_text()
        )
        assert entry["recall@10"] == pytest.approx(metrics["test/recall@10"])
        assert entry["ndcg@10"] == pytest.approx(metrics["test/ndcg@10"])
        assert entry["seconds"] > 0 and entry["epochs"] == 1 and entry["setup"] == run.setup
    if "incremental" in run.arms:  # trained from the initial model on the new period only
        saved = load_config(folders / "incremental-1" / "config.yaml")
        assert saved.split.train_from == run.steps[1].new_from == run.steps[0].valid_from


def test_update_replay_resumes_from_its_ledger_and_refuses_another_setup(
    update_replayed, monkeypatch, tmp_path
):
    run = update_replayed
    lines = run.ledger.read_text().splitlines()

    def no_training(*args, **kwargs):
        raise AssertionError("a recorded or finished run was trained again")

    monkeypatch.setattr(run.module, "train_run", no_training)
    run.module.replay(run.runs, run.arms, [0], run.ledger, run.setup)
    assert run.ledger.read_text().splitlines() == lines
    # a line lost after its run finished is scored again from the run folder
    run.ledger.write_text("\n".join(lines[:-1]) + "\n")
    run.module.replay(run.runs, run.arms, [0], run.ledger, run.setup)
    assert run.ledger.read_text().splitlines() == lines
    with pytest.raises(SystemExit, match="give another --ledger"):
        run.module.replay(run.runs, run.arms, [0], run.ledger, {"recipe": "other"})

    table = run.module.markdown([json.loads(line) for line in lines], run.steps)
    assert "| 0 |" in table and "| 1 |" in table and "| full |" in table
    run.module.plot([json.loads(line) for line in lines], tmp_path / "replay.png")
    assert (tmp_path / "replay.png").stat().st_size > 1000


@pytest.fixture
def filters_bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import filters

    return filters


def test_filters_corpus_keeps_one_and_ten_percent_and_its_recall_is_by_hand(filters_bench):
    vectors, items, _ = filters_bench.corpus(20_000, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    masks = filters_bench.FilterMasks(items)
    shares = [masks.select(f).mask.mean() for f in filters_bench.FILTERS.values() if f]
    assert abs(shares[0] - 0.01) < 0.003 and abs(shares[1] - 0.10) < 0.01
    truth = np.array([[1, 2, 3], [4, -1, -1]])
    found = np.array([[3, 9, 1], [5, 4, -1]])
    assert filters_bench.recall(found, truth) == 3 / 4
    sweep = [
        {"kept": 10, "searched_by": "exact over the kept", "batch_per_s": 900},
        {"kept": 10, "searched_by": "hnsw", "batch_per_s": 500},
        {"kept": 100, "searched_by": "exact over the kept", "batch_per_s": 400},
        {"kept": 100, "searched_by": "hnsw", "batch_per_s": 500},
        {"kept": 1000, "searched_by": "exact over the kept", "batch_per_s": 600},
        {"kept": 1000, "searched_by": "hnsw", "batch_per_s": 500},
    ]
    assert filters_bench.crossover(sweep) == 10  # up to the first size where it is slower


def test_filters_rows_measure_every_index_and_the_fallback_is_exact(filters_bench, tmp_path):
    vectors, items, centres = filters_bench.corpus(3000, 16)
    queries = filters_bench.points(np.random.default_rng(1), centres, 64)
    indexes = {
        kind: filters_bench.cached_index(kind, vectors, tmp_path / kind)[0]
        for kind in ("exact", "hnsw", "ivfpq")
    }
    assert filters_bench.cached_index("hnsw", vectors, tmp_path / "hnsw")[1] is None  # read
    args = dataclasses.make_dataclass("Args", ["repeats", "limit", "sweep"])(1, 100, [30, 300])
    rows, kept = filters_bench.measure_filters(indexes, vectors, items, queries, args)
    assert {(r["index"], r["filter"], r["path"]) for r in rows} == {
        (kind, name, "index") for kind in indexes for name in filters_bench.FILTERS
    } | {
        (kind, name, "fallback")
        for kind in ("hnsw", "ivfpq")
        for name in filters_bench.FILTERS
        if name != "none"
    }
    for row in rows:
        if row["searched_by"] == "ExactIndex":
            assert row["recall@10"] == 1.0 and row["short"] == 0.0, row
    assert [r["searched_by"] for r in rows if r["path"] == "fallback"] == [
        "ExactIndex",  # 1% of 3,000: 30 items, under the limit
        "ExactIndex",
        "HNSWIndex",  # 10%: 300, over it
        "IVFPQIndex",
    ]
    sweep = filters_bench.measure_sweep(indexes, vectors, queries, args)
    assert [(r["kept"], r["searched_by"]) for r in sweep] == [
        (size, name) for size in (30, 300) for name in ("exact over the kept", "hnsw", "ivfpq")
    ]
    result = {"items": 3000, "dim": 16, "queries": 64, "repeats": 1, "threads": 1}
    result |= {"limit": 100, "kept": kept, "rows": rows, "sweep": sweep, "crossover": 30}
    filters_bench.write_markdown(result, tmp_path / "filters.md")
    filters_bench.plot(result, tmp_path / "filters.png")
    assert (
        "| hnsw | category (1%) | fallback | ExactIndex | 1.000 |"
        in (tmp_path / "filters.md").read_text()
    )


def _next_item():
    """The next-item study's module (``benchmarks/next_item.py``)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import next_item

    return next_item


def test_next_item_chooses_eases_l2_on_validation_and_tables_the_lift(tmp_path):
    """The L2 of the best validation NDCG@10 is chosen; the table gives the recipe's mean
    ± std over seeds and its lift over EASE, computed by hand here."""
    study = _next_item()
    ease = tmp_path / "ease.jsonl"
    for l2, ndcg in ((10.0, 0.05), (30.0, 0.07), (100.0, 0.06)):
        study.record(ease, {"dataset": "toys", "l2": l2, "valid/ndcg@10": ndcg})
    assert study.chosen_l2(ease, "toys") == 30.0
    with pytest.raises(SystemExit, match="no EASE sweep for sports"):
        study.chosen_l2(ease, "sports")

    def row(model, seed, value, **more):
        metrics = {f"test/{m}": value for m in study.METRICS}
        return {"dataset": "toys", "model": model, "seed": seed} | more | metrics

    entries = [row("pop", 0, 0.01), row("ease", 0, 0.08, l2=30.0)]
    entries += [row("recipe", 0, 0.09), row("recipe", 1, 0.11)]
    lines = study.table(entries).splitlines()
    assert lines[3] == "| toys | EASE (L2 30) | 1 | " + " | ".join(["0.0800"] * 5) + " |"
    assert lines[4] == "| toys | recipe | 2 | " + " | ".join(["0.1000 ± 0.0100"] * 5) + " |"
    assert lines[5] == "| toys | recipe over EASE | | " + " | ".join(["+25.0%"] * 5) + " |"
    study.plot(entries, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_next_item_variants_are_read_checked_and_tabled_by_validation(tmp_path):
    """The valid step's variants come from a YAML mapping of override lists (an unknown
    name or a malformed entry is refused, naming the file); its table ranks variants by
    mean validation NDCG@10, computed by hand here."""
    study = _next_item()
    path = tmp_path / "variants.yaml"
    path.write_text(
        "a: [model.temperature=0.03]\nb: [training.lr=0.001, seed=3]\nc: 0.5\n"
        "d: {from: a, set: [training.lr=0.002]}\ne: {from: e}\n"
    )
    assert study.variants(path, ["b", "a", "d"]) == {
        "b": ["training.lr=0.001", "seed=3"],
        "a": ["model.temperature=0.03"],
        "d": ["model.temperature=0.03", "training.lr=0.002"],
    }
    with pytest.raises(SystemExit, match="variants.yaml: no variant 'z'"):
        study.variants(path, ["a", "z"])
    with pytest.raises(SystemExit, match="variant 'e' derives from itself"):
        study.variants(path, ["e"])
    with pytest.raises(SystemExit, match="variant 'c' must be a list"):
        study.variants(path, ["c"])

    def row(variant, seed, value):
        metrics = {f"valid/{m}": value for m in study.METRICS}
        entry = {"dataset": "toys", "variant": variant, "seed": seed, "epochs": 40}
        return entry | {"best_epoch": 10 + seed} | metrics

    lines = study.valid_table([row("a", 0, 0.04), row("b", 0, 0.05), row("b", 1, 0.07)])
    lines = lines.splitlines()
    assert (
        lines[2] == "| toys | b | 2 | 10/40,11/40 | " + " | ".join(["0.0600 ± 0.0100"] * 5) + " |"
    )
    assert lines[3] == "| toys | a | 1 | 10/40 | " + " | ".join(["0.0400"] * 5) + " |"


def test_the_shipped_next_item_recipe_is_the_chosen_variant_of_the_starting_point():
    """configs/next-item.yaml is what the valid step measured as ``CHOSEN``: the search's
    starting point with that variant's overrides, field by field, but for the refit
    that the test step adds (the baselines' footing)."""
    from twotower.config_io import to_dict

    study = _next_item()
    chosen = study.variants(study.VARIANTS_FILE, [study.CHOSEN])[study.CHOSEN]
    measured = study.dataset_config("toys", ROOT, chosen, study.START)
    shipped = study.dataset_config("toys", ROOT)
    assert shipped.training.refit and not measured.training.refit
    shipped = dataclasses.replace(
        shipped, training=dataclasses.replace(shipped.training, refit=False)
    )
    assert to_dict(shipped) == to_dict(measured)
    assert to_dict(shipped) != to_dict(study.dataset_config("toys", ROOT, [], study.START))


def test_unit_costs_reply_bytes_are_resp2_by_hand():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import unit_costs

    assert unit_costs.resp_size(4) == len(b":4\r\n")
    assert unit_costs.resp_size("hello") == len(b"$5\r\nhello\r\n")
    assert unit_costs.resp_size("\u00e9") == len(b"$2\r\n\xc3\xa9\r\n")  # bytes, not characters
    assert unit_costs.resp_size(["a", "bc"]) == len(b"*2\r\n$1\r\na\r\n$2\r\nbc\r\n")
    # HGETALL's reply in RESP2 is a flat array: field, value, field, value
    assert unit_costs.resp_size({"f": "v"}) == len(b"*2\r\n$1\r\nf\r\n$1\r\nv\r\n")
    assert unit_costs.resp_size([]) == len(b"*0\r\n")
    with pytest.raises(TypeError):
        unit_costs.resp_size(1.5)
    assert unit_costs.per_unit(1_000_000, 3) == 333_300.0
    assert unit_costs.per_unit(5, 0) == 0.0


def test_self_supervised_ledger_holds_the_groups_and_names_a_capped_run(tmp_path):
    """Two one-epoch synthetic runs: each line has the project's groups and says it was
    capped, a second call trains nothing again, and the table names the rows capped."""
    ledger = tmp_path / "ledger.jsonl"
    command = [sys.executable, str(ROOT / "benchmarks" / "self_supervised.py")]
    command += [f"--ledger={ledger}", "--datasets=synthetic", "--variants=off,uniform"]
    command += ["--seeds=1", "--epochs=synthetic=1", f"--plot={tmp_path / 'ndcg.png'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [e["variant"] for e in entries] == ["off", "uniform"]
    for e in entries:
        assert e["capped"] is True and e["epochs"] == 1 and e["best_epoch"] == 1
        assert 0 < e["valid/groups/item:tail/queries"] < e["valid/queries"]
        assert "valid/groups/item:head/ndcg@10" in e and "valid/groups/query:few/ndcg@10" in e
    assert "| off (capped at 1 epochs) | 1 | 1 |" in done.stdout
    assert (tmp_path / "ndcg.png").stat().st_size > 0
    again = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "epoch 1:" not in again.stdout + again.stderr
    assert ledger.read_text().splitlines() == [json.dumps(e) for e in entries]


def _new_items():
    """The new-items study's module (``benchmarks/new_items.py``)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import new_items

    return new_items


def test_new_items_validation_ledger_holds_no_test_metric(tmp_path, monkeypatch):
    """The runs the sweep chooses on report valid and test; its ledger keeps validation
    alone, and the test step reads test of the rate given and of 0 (by hand here)."""
    study = _new_items()
    trained = []

    def metrics(split, rate, seed, args):
        trained.append((split, rate, seed))
        values = {
            f"{part}/{alone}{m}": rate + seed / 10
            for part in ("valid", "test")
            for alone in study.ALONE
            for m in (*study.METRICS, "queries")
        }
        return values | {"best_epoch": 3}

    monkeypatch.setattr(study, "run_metrics", metrics)
    monkeypatch.setattr(
        study,
        "evaluate_baseline",
        lambda *a, **k: {
            f"test/{alone}{m}": 0.0 for alone in study.ALONE for m in (*study.METRICS, "queries")
        },
    )
    monkeypatch.setattr(study, "open_source", lambda config: None)
    args = dataclasses.make_dataclass("Args", [])()
    args.splits, args.rates, args.seeds = ["new-items"], [0.0, 0.25], [0, 1]
    args.ledger, args.data_dir = tmp_path / "valid.jsonl", DATASETS
    study.valid_rows(args)
    study.valid_rows(args)  # a rerun trains nothing the ledger holds
    entries = study.read(args.ledger)
    assert len(trained) == len(entries) == 4
    assert not [key for entry in entries for key in entry if key.startswith("test/")]
    assert "| new-items | 0.25 | 2 | 0.3000 ± 0.0500 |" in study.valid_table(entries)
    args.ledger, args.rate = tmp_path / "test.jsonl", 0.25
    study.test_rows(args)
    rows = study.read(args.ledger)
    assert [(r["model"], r["seed"]) for r in rows][3:] == [
        ("dropout 0", 0),
        ("dropout 0", 1),
        ("dropout 0.25", 0),
        ("dropout 0.25", 1),
    ]
    assert rows[-1]["test/new_items/ndcg@10"] == 0.35


def test_openloop_history_bodies_send_each_users_history_and_two_more_items(demo_artifact):
    """The open loop's request-time history bodies: each a known user with its stored
    history and two more of the artifact's items; the service answers every one, and
    the items sent count as seen."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import openloop
    from fastapi.testclient import TestClient

    from twotower.serving import Artifact
    from twotower.serving.http import create_app

    folder, _ = demo_artifact
    artifact = Artifact.load(folder)
    recent = artifact.recent
    stored = {  # each user's recent items, oldest first, as the artifact keeps them
        user: artifact.item_id_values[
            recent.rows[recent.indptr[row] : recent.indptr[row + 1]]
        ].tolist()[::-1]
        for row, user in enumerate(artifact.query_id_values.tolist())
    }
    items = set(artifact.item_id_values.tolist())
    sent = [json.loads(b) for b in openloop.bodies(folder, "history", count=40)]
    with TestClient(create_app(folder), client=("127.0.0.1", 50000)) as client:
        for body in sent:
            history = stored[body["user_id"]]
            assert body["history"][: len(history)] == history
            assert len(body["history"]) == len(history) + 2
            assert set(body["history"][len(history) :]) <= items
            answer = client.post("/recall", json=body)
            assert answer.status_code == 200, answer.text
            assert not set(answer.json()["items"]) & set(body["history"])


def test_openloop_compare_tables_p50_p99_per_rate_and_marks_saturation(tmp_path):
    """The side-by-side table: p50 / p99 where the service kept up, "saturated" where it
    answered under 90% of the offered rate or its p99 passed a second."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import openloop

    def row(rate, achieved, p50, p99, errors=0):
        return {
            "items": 1000, "body": "known", "offered_per_s": rate, "achieved_per_s": achieved,
            "p50_ms": p50, "p99_ms": p99, "non_2xx": errors, "socket_errors": 0,
        }  # fmt: skip

    ledger = tmp_path / "state-a.jsonl"
    rows = [row(250, 249.0, 1.04, 3.96), row(1000, 998.0, 2.5, 1200.0), row(2000, 1700.0, 9, 9, 3)]
    ledger.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    table = openloop.compare([ledger], rates=(250, 1000, 2000))
    assert table.splitlines()[-1] == (
        "| state-a | known | 1.0 / 4.0 | saturated | saturated | 1,700 (3 errors) |"
    )
    for run in ("before", "after"):  # two runs' own ledgers: named by their folders
        (tmp_path / run).mkdir()
        (tmp_path / run / "openloop.jsonl").write_text(ledger.read_text())
    table = openloop.compare([tmp_path / r / "openloop.jsonl" for r in ("before", "after")])
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == ["| before", "| after"]


def test_one_row_times_each_query_feature_and_the_batch_planning(demo_artifact):
    folder, _ = demo_artifact
    command = [sys.executable, str(ROOT / "benchmarks" / "one_row.py"), str(folder)]
    done = subprocess.run(
        [*command, "--repeat=1", "--number=3"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    from twotower.serving.artifact import Artifact

    pipeline = Artifact.load(folder).pipeline
    features = [
        n for n, t in pipeline.transforms["query"].items() if type(t).__name__ != "HistoryTransform"
    ]
    timed = [
        line.split("(")[0].strip() for line in done.stdout.splitlines() if "Transform," in line
    ]
    assert timed == features
    assert [line.split()[0] for line in done.stdout.splitlines() if "queries:" in line] == [
        "1",
        "3",
        "32",
    ]


def test_openloop_floor_app_answers_any_request_with_its_fixed_json(tmp_path):
    """The floor (``floor_app.py`` under uvicorn, as the open loop starts it) reads each
    request whole, whatever it is, and answers 200 with a recall-sized JSON."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import openloop

    process, url = openloop.start_floor(tmp_path / "floor.log")
    try:
        for body in (b'{"user_id": 1, "k": 10}', b"x" * 100_000, b""):
            request = urllib.request.Request(f"{url}/recall", data=body, method="POST")
            with urllib.request.urlopen(request, timeout=10) as answer:
                assert answer.status == 200
                assert len(json.loads(answer.read())["items"]) == 10
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert process.returncode is not None


def test_openloop_flame_graph_title_names_the_load_not_the_command(tmp_path):
    """py-spy titles its flame graph with its own command line (this machine's paths);
    the title is replaced, the frames kept."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import openloop

    svg = tmp_path / "profile.svg"
    frames = "<g><title>retrieve (twotower/serving/retriever.py:156)</title></g>"
    svg.write_text(
        '<svg><text id="title" x="50%">/home/u/.venv/bin/py-spy record --pid 7</text>'
        f'<text id="details"> </text>{frames}</svg>'
    )
    openloop.retitle(svg, "twotower serve under 1000 requests/s")
    assert svg.read_text() == (
        '<svg><text id="title" x="50%">twotower serve under 1000 requests/s</text>'
        f'<text id="details"> </text>{frames}</svg>'
    )
