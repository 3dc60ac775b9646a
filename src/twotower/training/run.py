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
import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from twotower.config import Config, save_config
from twotower.config_io import from_dict, to_dict
from twotower.data.build.format import FEATURES_DIR, built_stream
from twotower.data.dataset import Dataset
from twotower.data.splits import Split
from twotower.errors import ConfigError, DataError
from twotower.features.pipeline import FeaturePipeline
from twotower.features.streaming import (
    fit_stream_pipeline,
    load_fitted,
    read_items,
    save_fitted,
)
from twotower.prepare import load_data
from twotower.storage import atomic_write, remove_partial_files
from twotower.threads import set_threads
from twotower.towers.model import TwoTower
from twotower.training.built import evaluate_built
from twotower.training.checkpoint import CheckpointStore
from twotower.training.data import TrainingData
from twotower.training.distributed import Collective
from twotower.training.held_out import QueryTrainingData
from twotower.training.sequences import SequenceTrainingData
from twotower.training.streaming import StreamingTrainingData
from twotower.training.trainer import (
    EpochCallback,
    RunState,
    Trainer,
    evaluate_model,
    resolve_device,
)

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REFIT_DIR = "refit"  # training.refit's run, inside the run folder


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


def _stream_data(
    config: Config, out: Path, resume: bool, device: torch.device, main: bool
) -> StreamingTrainingData:
    """Streamed training data: features fitted by the data build, from the stream, or
    the run's saved ones when it resumes."""
    stream, built = built_stream(config.data.stream), config.data.stream.built
    features = out / "features"
    if resume:
        pipeline, counts, _ = load_fitted(features)
        items = read_items(stream, config.features)
    elif built is not None:
        pipeline, counts, exact = load_fitted(built / FEATURES_DIR)
        if to_dict(pipeline.config) != to_dict(config.features):
            raise ConfigError(
                f"{built}: built for other features than this config's; build it again "
                "with this config (twotower data build)"
            )
        items = read_items(stream, config.features)
        if main:
            save_fitted(features, pipeline, counts, exact)
    else:
        pipeline, items, counts, exact = fit_stream_pipeline(stream, config.features, config.seed)
        if main:
            save_fitted(features, pipeline, counts, exact)
    training = config.training
    return StreamingTrainingData(
        stream, pipeline, items, counts, device, config.seed, training.weights, training.weight_cap
    )


def _memory_data(
    config: Config,
    out: Path,
    resume: bool,
    device: torch.device,
    main: bool,
    loaded: tuple[Dataset, Split],
) -> TrainingData:
    """The ``loaded`` dataset and split, with features fitted on its training split (or
    the run's own)."""
    dataset, split = loaded
    if resume:
        pipeline = FeaturePipeline.load(out / "features")
    else:  # deterministic, so every rank fits the same state; rank 0 saves it
        pipeline = FeaturePipeline.fit(config.features, dataset, split.train)
        if main:
            pipeline.save(out / "features")
    if config.training.one_pass:
        training = config.training
        return SequenceTrainingData(
            dataset,
            split,
            pipeline,
            device,
            training.position_weights,
            training.weights,
            training.weight_cap,
        )
    training = config.training
    if training.examples == "queries":
        return QueryTrainingData(
            dataset,
            split,
            pipeline,
            device,
            training.holdout,
            training.position_weights,
            training.weights,
            training.weight_cap,
        )
    return TrainingData(
        dataset, split, pipeline, training.history, device, training.weights, training.weight_cap
    )


def train_run(
    config: Config, out: Path, resume: bool = False, on_epoch: EpochCallback | None = None
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
    """
    out = Path(out)
    set_threads(config.threads)
    device = resolve_device(config.training.device)
    collective = Collective.from_env(device)  # several processes under torchrun
    if resume and not CheckpointStore(out / "checkpoints").exists("last"):
        log.warning("%s: no checkpoint to resume from; training from the beginning", out)
        resume = False
    if resume:
        _check_resumable(out, config)
    if collective.is_main:
        for folder in (out, out / "features", out / "checkpoints"):
            for path in remove_partial_files(folder):
                log.info("removed %s, left by a write that was killed", path)
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    loaded = None if config.data.source == "stream" else load_data(config)
    if loaded is None:
        data = _stream_data(config, out, resume, device, collective.is_main)
    else:
        data = _memory_data(config, out, resume, device, collective.is_main, loaded)
    # seeded after the data is ready, so the initial weights do not depend on whatever
    # randomness reading and fitting the data used
    torch.manual_seed(config.seed)
    model = TwoTower.build(config.model, config.features, data.pipeline).to(device)
    extra = _extra(config, data.pipeline)
    trainer = Trainer(model, data, config.training, out, config.seed, extra, collective, on_epoch)
    state = trainer.fit(resume=resume)
    if not collective.is_main:  # rank 0 alone evaluates the best model and writes metrics
        return TrainResult({}, state, out)
    model.load_state_dict(trainer.store.load("best", map_location=device)["model"])
    metrics: dict[str, float] = {**trainer.evaluate("valid"), **trainer.evaluate("test")}
    metrics["best_epoch"] = state.best_epoch
    if config.training.refit:  # refused on a stream when the config is read
        assert loaded is not None
        metrics.update(_refit(config, out / REFIT_DIR, state, device, loaded))
    text = json.dumps(metrics, indent=2, sort_keys=True).encode("utf-8")
    atomic_write(out / METRICS_FILE, lambda f: f.write(text))
    return TrainResult(metrics, state, out)


def _refit(
    config: Config,
    out: Path,
    state: RunState,
    device: torch.device,
    loaded: tuple[Dataset, Split],
) -> dict[str, float]:
    """``training.refit``: the model trained again from scratch on train + validation,
    features fitted on them, for the first run's best epoch's number of epochs at that
    run's learning rates, no validation; returns its test metrics and ``refit_epochs``.

    Its test metrics are computed as the first run's: histories and seen items as of
    the end of validation. Its run folder ``out`` holds its features and checkpoints.
    ``loaded``: the first run's dataset and split.
    """
    dataset, split = loaded
    known = pa.concat_tables([split.train, split.valid])
    refit = Split(train=known, valid=split.valid.slice(0, 0), test=split.test)
    for path in remove_partial_files(out):
        log.info("removed %s, left by a write that was killed", path)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    data = _memory_data(config, out, False, device, True, (dataset, refit))
    torch.manual_seed(config.seed)
    model = TwoTower.build(config.model, config.features, data.pipeline).to(device)
    lrs = [record["lr"] for record in state.records[: state.best_epoch]]
    extra = _extra(config, data.pipeline)
    trainer = Trainer(model, data, config.training, out, config.seed, extra, lrs=lrs)
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
) -> dict[str, float]:
    """Ranks the full corpus with a run's saved model, on its own data and split.

    Args:
        run_dir: a folder written by ``train_run``.
        parts: ``valid`` and/or ``test``.
        ks: cutoffs; default the run's ``training.ks``.
        exclude_seen: drop the items each query saw before the part (default), or
            keep them in the ranking.
        checkpoint: ``best`` or ``last``.
        threads: CPU threads; default the run's ``threads``.
        sample: for a run on a data build, rank about this many queries of each part
            (a seeded sample, ``evaluate_built``); None: every query.
    """
    config, pipeline, model = load_model(run_dir, checkpoint)
    set_threads(threads or config.threads)
    device = resolve_device(config.training.device)
    model = model.to(device)
    ks = ks or config.training.ks
    batch_size = config.training.eval_batch_size
    metrics: dict[str, float] = {}
    if config.data.source == "stream":
        folder = config.data.stream.built
        if folder is None:
            raise ConfigError(
                "evaluating a streamed run reads each query's rows as of each part from a "
                "data build: build the data (twotower data build) and train on "
                "data.stream.built"
            )
        stream = built_stream(config.data.stream)
        for part in parts:
            metrics.update(
                evaluate_built(
                    model,
                    stream,
                    folder,
                    pipeline,
                    part,
                    ks,
                    exclude_seen,
                    batch_size,
                    sample,
                    config.seed,
                )
            )
        return metrics
    if sample is not None:
        raise ConfigError("a sample of queries is for a data build; in memory all are ranked")
    dataset, split = load_data(config)
    data = TrainingData(dataset, split, pipeline, config.training.history, device)
    for part in parts:
        metrics.update(
            evaluate_model(model, data, part, ks, exclude_seen=exclude_seen, batch_size=batch_size)
        )
    return metrics


def _check_resumable(out: Path, config: Config) -> None:
    """Refuses to resume a run under a config that changes its model, data or training."""
    store = CheckpointStore(out / "checkpoints")
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


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def _extra(config: Config, pipeline: FeaturePipeline) -> dict[str, Any]:
    """What every checkpoint carries besides weights: the config and the feature state."""
    text, arrays = pipeline.to_bytes()
    return {
        "config": to_dict(config),
        "features": {
            "json": text.decode("utf-8"),
            "arrays": torch.frombuffer(bytearray(arrays), dtype=torch.uint8),
        },
    }


def load_model(run_dir: Path, checkpoint: str = "best") -> tuple[Config, FeaturePipeline, TwoTower]:
    """Rebuilds a trained model from a run folder's checkpoint alone.

    Returns:
        The run's config, its fitted features and the model (on the CPU, eval mode).
    """
    state = CheckpointStore(Path(run_dir) / "checkpoints").load(checkpoint)
    where = f"{run_dir}/checkpoints/{checkpoint}"
    if "config" not in state or "features" not in state:
        raise DataError(f"{where}: lacks the config or the feature state")
    config = from_dict(Config, state["config"], where="config")
    features = state["features"]
    pipeline = FeaturePipeline.from_bytes(
        features["json"].encode("utf-8"), features["arrays"].numpy().tobytes(), where
    )
    model = TwoTower.build(config.model, config.features, pipeline)
    model.load_state_dict(state["model"])
    return config, pipeline, model.eval()
