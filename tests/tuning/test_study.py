"""The tuning loop: pruning, resume after SIGKILL, what it leaves, and its refusals.

Trials train the tiny config of conftest.py (200 users, 2 epochs, one thread): a few
seconds each.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from twotower.cli import app
from twotower.config import load_config
from twotower.errors import ConfigError
from twotower.tuning.space import parse_space
from twotower.tuning.study import TuneOptions, open_study, run_trials, tune

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
METRIC = "valid/ndcg@10"


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pruning_stops_a_trial_whose_learning_rate_is_zero(tiny_config, tmp_path):
    """lr 0 leaves the model at its initial weights: far below the median after one
    epoch. Trials are enqueued in a fixed order so the pruner's decisions are fixed."""
    space = parse_space(
        {"training.lr": {"type": "categorical", "choices": [0.01, 0.0]}}, tiny_config
    )
    options = TuneOptions(trials=3, startup_trials=1, warmup_epochs=1)
    study = open_study(tmp_path, tiny_config, space, options)
    for lr in (0.01, 0.0, 0.01):
        study.enqueue_trial({"training.lr": lr})
    run_trials(study, tiny_config, space, tmp_path, options)

    trials = study.get_trials()
    assert [t.state for t in trials] == [
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.COMPLETE,
    ]
    assert [t.params["training.lr"] for t in trials] == [0.01, 0.0, 0.01]
    pruned = tmp_path / "trials" / "0001"
    assert trials[1].last_step == 1 and len(_records(pruned)) == 1
    assert not (pruned / "metrics.json").exists()  # stopped before the final evaluation
    for trial in (trials[0], trials[2]):  # the value is the best validation value, never test
        run = tmp_path / trial.user_attrs["run"]
        assert len(_records(run)) == 2
        assert trial.value == max(r[METRIC] for r in _records(run))
        assert trial.value == pytest.approx(json.loads((run / "metrics.json").read_text())[METRIC])


@pytest.fixture(scope="module")
def killed_and_resumed(tiny_config_path, tmp_path_factory) -> Path:
    """A 3-trial tuning killed with SIGKILL as its second trial starts, then resumed."""
    out = tmp_path_factory.mktemp("tuning") / "out"
    space = out.parent / "space.yaml"
    space.write_text(
        "training.lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}\n"
        "model.query.widths: {type: categorical, choices: [[32], [64, 32]]}\n"
    )
    command = [sys.executable, "-m", "twotower", "tune", str(tiny_config_path)]
    command += ["--space", str(space), "--trials", "3", "--out", str(out)]
    process = subprocess.Popen(
        command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "trials" / "0001").exists():  # trial 0 done, trial 1 running
            assert process.poll() is None, "the tuning ended before it could be killed"
            assert time.monotonic() < deadline, "the second trial never started"
            time.sleep(0.01)
    finally:
        process.kill()  # SIGKILL: no handler, no cleanup
        process.wait()
    done = subprocess.run(
        [*command, "--resume"], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _study(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="twotower", storage=f"sqlite:///{out / 'study.db'}")


def test_a_killed_tuning_resumes_to_exactly_n_trials(killed_and_resumed):
    out = killed_and_resumed
    trials = _study(out).get_trials()
    states = [t.state for t in trials]
    # trial 1 was running when the process died: failed, not counted, run again as trial 2
    assert states == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    assert trials[2].user_attrs["retry_of"] == 1 and trials[2].params == trials[1].params
    assert trials[3].params != trials[0].params  # the resumed session draws on, not again
    numbers = [t.number for t in trials]
    assert numbers == sorted(set(numbers))
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"{n:04d}" for n in numbers]
    rows = (out / "trials.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["number", "state", "value", "duration_s"]
    assert [row.split(",")[:2] for row in rows[1:]] == [
        [str(t.number), t.state.name] for t in trials
    ]
    assert "cut short" in rows[2] and "runs trial 1 again" in rows[3]


def test_a_finished_tuning_leaves_the_best_config_plots_and_test_metrics(killed_and_resumed):
    out = killed_and_resumed
    study = _study(out)
    best = max(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    trial_config = load_config(out / best.user_attrs["run"] / "config.yaml")
    assert load_config(out / "best.yaml") == trial_config
    assert trial_config.training.lr == best.params["training.lr"]
    test = json.loads((out / "best_test_metrics.json").read_text())
    assert test["trial"] == best.number
    assert {key for key in test if key != "trial"} == {
        k
        for k in json.loads((out / best.user_attrs["run"] / "metrics.json").read_text())
        if k.startswith("test/")
    }
    for plot in ("optimization_history.png", "param_importances.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_existing_tuning_needs_resume_and_the_same_setup(tiny_config, tmp_path):
    space = parse_space({"training.lr": {"type": "float", "low": 0.001, "high": 0.01}}, tiny_config)
    open_study(tmp_path, tiny_config, space, TuneOptions(trials=1))
    with pytest.raises(ConfigError, match="pass --resume to continue it, or pick another"):
        open_study(tmp_path, tiny_config, space, TuneOptions(trials=1))
    other = parse_space({"training.lr": {"type": "float", "low": 0.001, "high": 0.1}}, tiny_config)
    with pytest.raises(ConfigError, match="differ from the tuning's: the search space"):
        open_study(tmp_path, tiny_config, other, TuneOptions(trials=1, resume=True))
    with open(tmp_path / ".tune.lock", "a") as handle:  # another tuning holds the folder
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another twotower tune is running"):
            tune(tiny_config, space, tmp_path, TuneOptions(trials=1, resume=True))


def test_tune_says_how_to_install_optuna_when_it_is_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now fails
    for module in ("twotower.tuning.study", "twotower.tuning.report"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    args = ["tune", "c.yaml", "--space", "s.yaml", "--trials", "1", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, ConfigError)
    assert "pip install 'twotower[tune]'" in str(result.exception)


def test_the_command_passes_its_pruning_options_to_the_tuning(
    tiny_config_path, tmp_path, monkeypatch
):
    seen = []

    def record(config, space, out, options):
        seen.append(options)
        raise ConfigError("stopped before any trial")

    monkeypatch.setattr("twotower.tuning.study.tune", record)
    space = tmp_path / "space.yaml"
    space.write_text("training.lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}\n")
    args = ["tune", str(tiny_config_path), "--space", str(space), "--trials", "3"]
    args += ["--out", str(tmp_path / "out")]
    CliRunner().invoke(app, args)
    CliRunner().invoke(app, [*args, "--prune-after", "30", "--startup-trials", "0"])
    assert [(o.warmup_epochs, o.startup_trials) for o in seen] == [
        (TuneOptions.warmup_epochs, TuneOptions.startup_trials),
        (30, 0),
    ]
