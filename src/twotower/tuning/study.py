"""The study: Optuna's TPE sampler over ordinary training runs, kept in SQLite so it resumes.

A tuning folder holds ``study.db`` (the Optuna study: each trial's values, state and
per-epoch validation values), ``trials/NNNN/`` (trial NNNN's run folder, written by
``train_run`` as ``twotower train`` writes one, with its ``train.log``) and, at the end,
what ``report.py`` writes.

- **What is maximized**: each trial's best validation value of ``training.metric``;
  test is never looked at while searching.
- **Pruning**: after each epoch the trial reports its validation value; a median
  pruner stops a trial whose value is below the median of earlier trials at that
  epoch (once ``startup_trials`` have completed, from epoch ``warmup_epochs`` on).
  The run's own early stopping works as in any run.
- **Resume**: one process tunes a folder at a time (it holds ``.tune.lock``), so a
  trial still RUNNING in the study when the folder is opened again was cut short by
  a killed process: it is marked FAIL and its values enqueued again, as is a trial
  that failed for another reason than a config error (Ctrl-C, a crash). ``trials``
  counts finished trials (complete, pruned, or failed on a config error), so a
  resumed tuning runs only the ones left, and none is counted twice.
- **Parallel trials** (``jobs``): Optuna's ``n_jobs``, i.e. threads of this one
  process. Torch computes outside the GIL, so the trials' matrix work overlaps, and
  one process keeps one study connection, one progress bar and the lock that makes
  resuming safe; the price is that the trials' Python work shares the GIL, and that
  their weights draw from torch's one global generator, so with ``jobs > 1`` a trial
  is not bit-for-bit reproducible. The CPU threads (``threads``, else every CPU
  available) are split among the jobs, so J trials do not oversubscribe the cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from twotower.config import Config
from twotower.config_io import to_dict
from twotower.errors import ConfigError
from twotower.threads import default_threads
from twotower.training.run import train_run
from twotower.tuning.logs import TrialLogs
from twotower.tuning.report import Report, write_report
from twotower.tuning.space import SearchSpace, with_values

log = logging.getLogger(__name__)

STUDY_NAME = "twotower"
STUDY_FILE = "study.db"
TRIALS_DIR = "trials"
LOCK_FILE = ".tune.lock"


@dataclasses.dataclass(frozen=True)
class TuneOptions:
    """How a tuning runs.

    Attributes:
        trials: how many trials to finish: complete, pruned, or failed on a config
            error. Trials a killed or interrupted process left unfinished run again.
        timeout: start no new trial after this many seconds (running ones finish);
            None: no limit.
        jobs: trials at once, as threads of this process.
        resume: continue the study in the folder; without it a folder holding a study
            is an error.
        startup_trials: no trial is pruned before this many have completed.
        warmup_epochs: the earliest epoch at which a trial can be pruned.
    """

    trials: int
    timeout: float | None = None
    jobs: int = 1
    resume: bool = False
    startup_trials: int = 5
    warmup_epochs: int = 2

    def __post_init__(self) -> None:
        if self.trials < 1 or self.jobs < 1:
            raise ConfigError(f"--trials and --jobs must be >= 1, got {self.trials}, {self.jobs}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"--timeout must be > 0 seconds, got {self.timeout}")
        if self.startup_trials < 0 or self.warmup_epochs < 0:
            raise ConfigError("startup_trials and warmup_epochs must be >= 0")


def tune(config: Config, space: SearchSpace, out: Path, options: TuneOptions) -> Report:
    """Searches ``space`` around ``config``, then writes the report into ``out``.

    Args:
        config: the base config every trial starts from.
        space: the keys to vary (``load_space``).
        out: the tuning folder (created if needed).
        options: trials, timeout, jobs, resume, pruning.

    Returns:
        The best trial, its config and test metrics, and where the outputs are.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _only_tuning(out):
        study = open_study(out, config, space, options)
        run_trials(study, config, space, out, options)
        return write_report(study, config, space, out)


def open_study(out: Path, config: Config, space: SearchSpace, options: TuneOptions) -> optuna.Study:
    """Creates the study in ``out/study.db`` or, with ``resume``, opens it again.

    On resume the config and space must be the ones the study began with, and every
    trial left unfinished is marked FAIL and enqueued again with the same values.

    Raises:
        ConfigError: ``out`` holds a study and ``resume`` is off, or the config or
            space changed.
    """
    db, trials = out / STUDY_FILE, out / TRIALS_DIR
    if not options.resume and (db.exists() or trials.exists()):
        raise ConfigError(
            f"{out} already holds a tuning ({STUDY_FILE}, {TRIALS_DIR}/): pass --resume to "
            "continue it, or pick another --out folder"
        )
    if trials.exists() and not db.exists():
        raise ConfigError(f"{out} holds {TRIALS_DIR}/ but no {STUDY_FILE}: pick another folder")
    if options.resume and not db.exists():
        log.warning("%s: no tuning to resume; starting one", out)
    out.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{db.resolve()}",
        engine_kwargs={"connect_args": {"timeout": 60}},  # parallel trials wait for the lock
    )
    study = optuna.create_study(
        storage=storage,
        study_name=STUDY_NAME,
        direction="maximize",
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=options.startup_trials, n_warmup_steps=options.warmup_epochs
        ),
        load_if_exists=True,
    )
    _check_setup(study, config, space, out)
    # seeded by the config, and on by the trials already run: a resumed session with the
    # first session's seed would draw the first session's values again; constant_liar:
    # trials running in parallel count as bad ones, so they are not drawn twice
    seed = config.seed + len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    _retry_unfinished(study)
    return study


def run_trials(
    study: optuna.Study, config: Config, space: SearchSpace, out: Path, options: TuneOptions
) -> None:
    """Runs trials until ``options.trials`` have finished (or the timeout), with a bar."""
    done = sum(_counted(t) for t in study.get_trials(deepcopy=False))
    if done >= options.trials:
        return
    objective = _Objective(config, space, out, _trial_threads(config, options.jobs))
    metric = config.training.metric
    # like the epoch bars: drawn on a terminal only (disable=None)
    bar = tqdm(total=options.trials, initial=done, desc="trials", unit="trial", disable=None)

    def progress(study: optuna.Study, trial: FrozenTrial) -> None:
        bar.update(int(_counted(trial)))
        if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            best = study.best_trial
            bar.set_postfix_str(f"best {metric} {best.value:.4f} (trial {best.number})")

    console = [logging.getLogger(), logging.getLogger("optuna")]
    with bar, logging_redirect_tqdm(console), objective.logs.quiet_console():
        study.optimize(
            objective,
            n_trials=options.trials - done,
            timeout=options.timeout,
            n_jobs=options.jobs,
            catch=(ConfigError,),
            callbacks=[progress],
        )


def _counted(trial: FrozenTrial) -> bool:
    """Whether a trial counts toward ``trials``: finished, or failed on a config error."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and "error" in trial.user_attrs


class _Objective:
    """One trial: the config with the trial's values, trained into ``trials/NNNN``."""

    def __init__(self, config: Config, space: SearchSpace, out: Path, threads: int | None):
        self.config, self.space, self.out, self.threads = config, space, out, threads
        self.logs = TrialLogs()

    def __call__(self, trial: optuna.Trial) -> float:
        values = self.space.suggest(trial)
        run_dir = self.out / TRIALS_DIR / f"{trial.number:04d}"
        trial.set_user_attr("run", run_dir.relative_to(self.out).as_posix())
        metric = self.config.training.metric

        def report(epoch: int, record: dict[str, Any]) -> None:
            trial.report(record[metric], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(
                    f"epoch {epoch}: {metric} {record[metric]:.4f} is below the median of "
                    "the earlier trials at that epoch"
                )

        run_dir.mkdir(parents=True, exist_ok=True)
        with self.logs.to(run_dir / "train.log"):
            try:
                config = with_values(self.config, values)
                if self.threads is not None:
                    config = dataclasses.replace(config, threads=self.threads)
                return train_run(config, run_dir, on_epoch=report).state.best
            except ConfigError as err:  # these values do not go together: the trial fails
                trial.set_user_attr("error", str(err))
                log.warning("trial %d: %s", trial.number, err)
                raise


def _trial_threads(config: Config, jobs: int) -> int | None:
    """Each trial's CPU threads: the config's (or the default: the thread variables, else
    every CPU available) shared by ``jobs``."""
    if jobs == 1:
        return None
    return max(1, (config.threads or default_threads()) // jobs)


def _check_setup(study: optuna.Study, config: Config, space: SearchSpace, out: Path) -> None:
    """Stores the config and space in a new study; refuses to resume under other ones."""
    setup = {
        # threads may change between sessions; it does not change what a trial computes
        "config": json.loads(json.dumps({**to_dict(config), "threads": None})),
        "space": json.loads(json.dumps(space.to_dict())),
    }
    saved = {key: study.user_attrs.get(key) for key in setup}
    if saved["config"] is None:  # a new study (or one killed before this was stored)
        for key, value in setup.items():
            study.set_user_attr(key, value)
        return
    changed = [f"config {k}" for k in setup["config"] if setup["config"][k] != saved["config"][k]]
    if setup["space"] != saved["space"]:
        changed.append("the search space")
    if changed:
        raise ConfigError(
            f"{out}: cannot resume with a changed setup; these differ from the tuning's: "
            f"{', '.join(changed)} (pick another --out folder for a new tuning)"
        )


def _retry_unfinished(study: optuna.Study) -> None:
    """Marks trials a killed process left RUNNING as FAIL and enqueues every trial that
    failed for another reason than a config error again, once, with its values."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for trial in trials:
        if trial.state == TrialState.RUNNING:  # no other process holds the folder
            study.tell(trial.number, state=TrialState.FAIL)
            log.info("trial %d was cut short; marked failed", trial.number)
        elif trial.state != TrialState.FAIL or "error" in trial.user_attrs:
            continue
        if trial.number not in retried:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            log.info("trial %d will run again with the same values", trial.number)


@contextlib.contextmanager
def _only_tuning(out: Path) -> Iterator[None]:
    """Holds ``out/.tune.lock``: a second tuning of the same folder fails at once."""
    with open(out / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{out}: another twotower tune is running on this folder") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
