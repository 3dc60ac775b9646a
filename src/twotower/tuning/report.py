"""What a tuning leaves in its folder once its trials are done.

best.yaml                  the best trial's config, ready for ``twotower train``
trials.csv                 every trial: number, state, value, duration, values, note
optimization_history.png   each trial's value and the best so far
param_importances.png      how much each key moved the value (PED-ANOVA)
best_test_metrics.json     the best trial's model ranked on test, the one time
                           the tuning looks at test
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from twotower.config import Config, save_config
from twotower.storage import atomic_write
from twotower.training.run import evaluate_run
from twotower.tuning.space import SearchSpace, with_values

log = logging.getLogger(__name__)

BEST_CONFIG = "best.yaml"
TRIALS_TABLE = "trials.csv"
TEST_METRICS = "best_test_metrics.json"
PLOTS = ("optimization_history.png", "param_importances.png")


@dataclasses.dataclass(frozen=True)
class Report:
    """The outcome of a tuning.

    Attributes:
        study: the Optuna study.
        best: the completed trial with the highest validation value; None if none
            completed.
        config: the best trial's config (``best.yaml``), or None.
        test_metrics: the best trial's test metrics, or None.
        out: the tuning folder.
    """

    study: optuna.Study
    best: FrozenTrial | None
    config: Config | None
    test_metrics: dict[str, float] | None
    out: Path


def write_report(study: optuna.Study, config: Config, space: SearchSpace, out: Path) -> Report:
    """Writes the trials table and plots and, if a trial completed, ``best.yaml`` and
    the best trial's test metrics (its best checkpoint, ranked as ``twotower evaluate``
    ranks it)."""
    trials = study.get_trials(deepcopy=False)
    text = trials_table(trials, space)
    atomic_write(out / TRIALS_TABLE, lambda f: f.write(text.encode("utf-8")))
    plot_study(study, config.training.metric, out)
    if not any(t.state == TrialState.COMPLETE for t in trials):
        log.warning("%s: no trial completed, so there is no best config", out)
        return Report(study, None, None, None, out)
    best = study.best_trial
    best_config = with_values(config, space.values(best.params))
    save_config(best_config, out / BEST_CONFIG)
    metrics = evaluate_run(out / best.user_attrs["run"], ("test",), threads=config.threads)
    body = json.dumps({"trial": best.number, **metrics}, indent=2, sort_keys=True)
    atomic_write(out / TEST_METRICS, lambda f: f.write(body.encode("utf-8")))
    return Report(study, best, best_config, metrics, out)


def trials_table(trials: list[FrozenTrial], space: SearchSpace) -> str:
    """CSV text: one row per trial, one column per searched key."""
    keys = list(space.ranges)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["number", "state", "value", "duration_s", *keys, "run", "note"])
    for trial in trials:
        seconds = trial.duration.total_seconds() if trial.duration is not None else None
        writer.writerow(
            [
                trial.number,
                trial.state.name,
                _cell(trial.value),
                _cell(None if seconds is None else round(seconds, 1)),
                *(_cell(trial.params.get(key)) for key in keys),
                trial.user_attrs.get("run", ""),
                _note(trial),
            ]
        )
    return buffer.getvalue()


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def _note(trial: FrozenTrial) -> str:
    notes = []
    if "retry_of" in trial.user_attrs:
        notes.append(f"runs trial {trial.user_attrs['retry_of']} again")
    if trial.state == TrialState.PRUNED and trial.last_step is not None:
        notes.append(f"pruned after epoch {trial.last_step}")
    if "error" in trial.user_attrs:
        notes.append(trial.user_attrs["error"])
    elif trial.state == TrialState.FAIL:
        notes.append("cut short (killed or interrupted)")
    return "; ".join(notes)


def plot_study(study: optuna.Study, metric: str, out: Path) -> None:
    """The optimization history and the parameter importances, as PNG files in ``out``
    (the importances once two trials have completed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import (
        plot_optimization_history,
        plot_param_importances,
    )

    with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        plots = {PLOTS[0]: lambda: plot_optimization_history(study, target_name=metric)}
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(complete) >= 2:
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            plots[PLOTS[1]] = lambda: plot_param_importances(
                study, evaluator=evaluator, target_name=metric
            )
        for name, plot in plots.items():
            axes = plot()
            axes.figure.savefig(out / name, dpi=120, bbox_inches="tight")
            plt.close(axes.figure)
