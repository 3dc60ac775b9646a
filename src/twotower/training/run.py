"""A whole training run from a config: data, split, features, model, training, metrics.

The run folder holds everything needed to rebuild the model, with no pickle:

    config.yaml        the resolved config
    features/          the fitted feature state (JSON + numpy, checksummed)
    checkpoints/       best and last checkpoints (with config and feature state inside)
    metrics.jsonl      one record per epoch; TensorBoard files under tensorboard/
    curves.png         loss and validation curves
    metrics.json       the best epoch's validation and test metrics
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from twotower.config import Config, save_config
from twotower.config_io import from_dict, to_dict
from twotower.errors import ConfigError
from twotower.evaluation.per_query import QueryMetrics
from twotower.features.pipeline import FeaturePipeline
from twotower.sources import DataSource, FittedFeatures, open_source
from twotower.storage import remove_partial_files, write_json
from twotower.threads import set_threads
from twotower.towers.model import TwoTower
from twotower.training.checkpoint import CheckpointStore
from twotower.training.distributed import Collective
from twotower.training.evaluate import evaluate_source
from twotower.training.examples import EXAMPLES
from twotower.training.saved import REFIT_DIR, checkpoint_extra, load_model, reported_model
from twotower.training.trainer import EpochCallback, RunPlan, RunState, Trainer, resolve_device
from twotower.training.warm_start import WarmStart, record_start

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a run produced.

    Attributes:
        metrics: the best checkpoint's ``valid/...`` and ``test/...`` metrics, and
            ``best_epoch``.
        state: the final run state (per-epoch records, best epoch).
        out: the run folder.
    """

    metrics: dict[str, float]
    state: RunState
    out: Path


def _features(
    source: DataSource,
    config: Config,
    folder: Path,
    resume: bool,
    main: bool,
    warm: WarmStart | None = None,
) -> FittedFeatures:
    """The run's features: its saved ones when it resumes, else fitted by the source, or
    with a warm start the earlier run's grown by it (deterministic, so every rank fits
    the same state; rank 0 saves them in ``folder``)."""
    if resume:
        return FittedFeatures.load(folder)
    features = source.fit_features(config, None if warm is None else warm.pipeline)
    if main:
        features.save(folder)
    return features


def train_run(
    config: Config,
    out: Path,
    resume: bool = False,
    on_epoch: EpochCallback | None = None,
    init_from: Path | None = None,
) -> TrainResult:
    """Trains the model a config describes and writes the run folder ``out``.

    Under ``torchrun`` every process calls this; they train one model together and
    rank 0 alone writes the run folder and returns the metrics (others get none).

    Args:
        config: the resolved config.
        out: the run folder, created if needed.
        resume: continue from ``out``'s last checkpoint (its saved feature state is
            reused, so the model sees the same inputs). A run killed before its first
            checkpoint has nothing to continue from and starts again from the beginning,
            so a pipeline can always pass ``resume=True``.
        on_epoch: called after each epoch with its number and record (``Trainer``); an
            exception it raises stops the run there, before the final metrics.
        init_from: an earlier run folder to start from (a warm start,
            ``twotower.training.warm_start``): its features grown with this run's
            training examples, its weights and optimizer state carried over, a fresh
            learning-rate schedule. ``out`` records it (``init_from.json``); a resumed
            run continues from its own checkpoint, and need not be given it again.

    Raises:
        ConfigError: ``init_from``'s model or features differ from the config's (named).
        DataError: ``init_from`` is not a run folder with a trained model.
    """
    out = Path(out)
    set_threads(config.threads)
    device = resolve_device(config.training.device)
    collective = Collective.from_env(device)  # several processes under torchrun
    resume = resume and _resumable(out, config)
    warm = WarmStart.for_run(out, init_from, resume, config, device)
    if collective.is_main:
        _prepare_folder(out, config, (out, out / "features", out / "checkpoints"))
        if not resume:
            record_start(out, warm)
    source = open_source(config)
    features = _features(source, config, out / "features", resume, collective.is_main, warm)
    plan = RunPlan(config.training)
    start = None if resume else warm  # a resumed run's own checkpoint holds its start
    trainer = _trainer(source, config, out, features, plan, start, collective, on_epoch)
    state = trainer.fit(resume=resume)
    if not collective.is_main:  # rank 0 alone evaluates the best model and writes metrics
        return TrainResult({}, state, out)
    trainer.model.load_state_dict(trainer.store.load("best", map_location=device)["model"])
    metrics: dict[str, float] = {**trainer.evaluate("valid"), **trainer.evaluate("test")}
    metrics["best_epoch"] = state.best_epoch
    if config.training.refit:  # refused on a stream when the config is read
        metrics.update(_refit(config, out / REFIT_DIR, state, source.refit(), warm))
    write_json(out / METRICS_FILE, metrics)
    return TrainResult(metrics, state, out)


def _prepare_folder(out: Path, config: Config, folders: tuple[Path, ...]) -> None:
    """Clears what a killed write left in ``folders`` and writes the config."""
    for folder in folders:
        for path in remove_partial_files(folder):
            log.info("removed %s, left by a write that was killed", path)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")


def _trainer(
    source: DataSource,
    config: Config,
    out: Path,
    features: FittedFeatures,
    plan: RunPlan,
    warm: WarmStart | None,
    collective: Collective | None = None,
    on_epoch: EpochCallback | None = None,
) -> Trainer:
    """The examples, the model (seeded, or started from ``warm``) and their trainer."""
    device = resolve_device(config.training.device)
    data = source.examples(EXAMPLES[config.training.examples], config, features, device)
    # seeded after the data is ready, so the initial weights do not depend on whatever
    # randomness reading and fitting the data used
    torch.manual_seed(config.seed)
    model = TwoTower.build(config.model, config.features, data.pipeline).to(device)
    extra = checkpoint_extra(config, data.pipeline)
    trainer = Trainer(model, data, plan, out, config.seed, extra, collective, on_epoch)
    if warm is not None:
        warm.initialise(model, trainer.optimizers)
    return trainer


def _refit(
    config: Config, out: Path, state: RunState, source: DataSource, warm: WarmStart | None
) -> dict[str, float]:
    """``training.refit``: the model trained again from scratch (or from ``warm``, as the
    first run was) on train + validation, features fitted on them, for the first run's
    best epoch's number of epochs at that run's learning rates, no validation; returns
    its test metrics and ``refit_epochs``.

    Its test metrics are computed as the first run's: histories and seen items as of
    the end of validation. Its run folder ``out`` holds its features and checkpoints;
    it is the model the run reports on test, so export serves it (``reported_model``).
    ``source``: the first run's data, validation moved into training (``refit``).
    """
    _prepare_folder(out, config, (out,))
    record_start(out, warm)
    features = _features(source, config, out / "features", False, True, warm)
    lrs = tuple(record["lr"] for record in state.records[: state.best_epoch])
    trainer = _trainer(source, config, out, features, RunPlan(config.training, lrs), warm)
    log.info("refit on train + validation: %d epochs", len(lrs))
    trainer.fit()
    return {**trainer.evaluate("test"), "refit_epochs": len(lrs)}


# What may change when a run is resumed: how long it goes on and where it runs.
RESUMABLE_CHANGES = frozenset(
    {"training.epochs", "training.patience", "training.device", "training.tensorboard", "threads"}
)


def evaluate_run(
    run_dir: Path,
    parts: tuple[str, ...] = ("valid", "test"),
    ks: list[int] | None = None,
    exclude_seen: bool = True,
    checkpoint: str = "best",
    threads: int | None = None,
    sample: int | None = None,
    per_query: QueryMetrics | None = None,
) -> dict[str, float]:
    """Ranks the full corpus with a run's saved model, on its own data and split.

    Each part is ranked with the model the run reports on it (``reported_model``: on
    test, a refitted run's refit), so the metrics are the run's own.

    Args:
        run_dir: a folder written by ``train_run``.
        parts: ``valid`` and/or ``test``.
        ks: cutoffs; default the run's ``training.ks``.
        exclude_seen: drop the items each query saw before the part (default), or
            keep them in the ranking.
        checkpoint: ``best`` or ``last``.
        threads: CPU threads; default the run's ``threads``.
        sample: for a run on a data build, rank about this many queries of each part
            (a seeded sample); None: every query.
        per_query: where each evaluated query's metrics are kept, if given.
    """
    metrics: dict[str, float] = {}
    source: DataSource | None = None
    models: dict[Path, tuple[Config, FeaturePipeline, TwoTower]] = {}
    for part in parts:
        folder = reported_model(run_dir, part, checkpoint)
        if folder not in models:  # valid and test share a model unless the run refitted
            models[folder] = load_model(folder, checkpoint)
        config, pipeline, model = models[folder]
        set_threads(threads or config.threads)
        source = source or open_source(config)
        model = model.to(resolve_device(config.training.device))
        training = config.training
        metrics |= evaluate_source(
            model,
            source,
            pipeline,
            part,
            ks or training.ks,
            exclude_seen,
            training.eval_batch_size,
            sample,
            config.seed,
            per_query,
        )
    return metrics


def save_evaluation(
    run_dir: Path, metrics: dict[str, float], parts: tuple[str, ...], exclude_seen: bool
) -> Path:
    """Writes ``evaluate_run``'s metrics into the run folder; returns the file
    (``evaluation-{valid,test,both}[-keep-seen].json``)."""
    name = "both" if len(parts) > 1 else parts[0]
    path = Path(run_dir) / f"evaluation-{name}{'' if exclude_seen else '-keep-seen'}.json"
    write_json(path, metrics)
    return path


def _resumable(out: Path, config: Config) -> bool:
    """Whether ``out`` has a checkpoint to resume from (a run killed before its first
    has none: it starts again from the beginning).

    Raises:
        ConfigError: the config changes the run's model, data or training.
    """
    store = CheckpointStore(out / "checkpoints")
    if not store.exists("last"):
        log.warning("%s: no checkpoint to resume from; training from the beginning", out)
        return False
    saved = from_dict(Config, store.load("last")["config"], where="checkpoint config")
    changed = sorted(
        key
        for key, value in _flat(to_dict(config)).items()
        if _flat(to_dict(saved)).get(key) != value and key not in RESUMABLE_CHANGES
    )
    if changed:
        raise ConfigError(
            f"{out}: cannot resume with a changed config; these differ from the run's: "
            f"{', '.join(changed)} (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)"
        )
    return True


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}
