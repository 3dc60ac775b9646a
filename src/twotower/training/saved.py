"""What a run folder's checkpoints hold besides weights, and the model a run reports.

Every checkpoint carries the resolved config and the fitted feature state
(``checkpoint_extra``), so ``read_saved`` rebuilds a run's model from its checkpoint
alone. ``reported_model`` says which folder's model a run reports: its own, or on test
its refit's (``training.refit``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from twotower.config import Config
from twotower.config_io import from_dict, to_dict
from twotower.errors import DataError
from twotower.features.pipeline import FeaturePipeline
from twotower.towers.model import TwoTower
from twotower.training.checkpoint import CheckpointStore

REFIT_DIR = "refit"  # training.refit's run, inside the run folder


@dataclasses.dataclass(frozen=True)
class SavedModel:
    """A checkpoint read back: its run's config and features, and what it stores.

    Attributes:
        config: the run's resolved config.
        pipeline: its fitted features.
        state: the checkpoint itself (``model``: the weights; ``epoch``; ...).
        path: the checkpoint file.
        sha256: its checksum, as its pointer records it (verified on reading).
    """

    config: Config
    pipeline: FeaturePipeline
    state: dict[str, Any]
    path: Path
    sha256: str


def checkpoint_extra(config: Config, pipeline: FeaturePipeline) -> dict[str, Any]:
    """What every checkpoint carries besides weights: the config and the feature state."""
    text, arrays = pipeline.to_bytes()
    return {
        "config": to_dict(config),
        "features": {
            "json": text.decode("utf-8"),
            "arrays": torch.frombuffer(bytearray(arrays), dtype=torch.uint8),
        },
    }


def read_saved(
    run_dir: Path, checkpoint: str = "best", map_location: str | torch.device = "cpu"
) -> SavedModel:
    """Reads checkpoint ``checkpoint`` of a run folder, with its config and features.

    Raises:
        DataError: the checkpoint is missing, corrupt or lacks the config or features.
    """
    store = CheckpointStore(Path(run_dir) / "checkpoints")
    state = store.load(checkpoint, map_location=map_location)
    where = f"{run_dir}/checkpoints/{checkpoint}"
    if "config" not in state or "features" not in state:
        raise DataError(f"{where}: lacks the config or the feature state")
    config = from_dict(Config, state["config"], where="config")
    features = state["features"]
    pipeline = FeaturePipeline.from_bytes(
        features["json"].encode("utf-8"), features["arrays"].numpy().tobytes(), where
    )
    return SavedModel(config, pipeline, state, store.path(checkpoint), store.sha256(checkpoint))


def load_model(run_dir: Path, checkpoint: str = "best") -> tuple[Config, FeaturePipeline, TwoTower]:
    """Rebuilds a trained model from a run folder's checkpoint alone.

    Returns:
        The run's config, its fitted features and the model (on the CPU, eval mode).
    """
    saved = read_saved(run_dir, checkpoint)
    model = TwoTower.build(saved.config.model, saved.config.features, saved.pipeline)
    model.load_state_dict(saved.state["model"])
    return saved.config, saved.pipeline, model.eval()


def reported_model(run_dir: Path, part: str = "test", checkpoint: str = "best") -> Path:
    """The run folder of the model whose ``part`` metrics ``run_dir`` reports: on test,
    the refit (``refit/``) of a run with ``training.refit``; otherwise the run itself."""
    refit = Path(run_dir) / REFIT_DIR
    if part == "test" and CheckpointStore(refit / "checkpoints").exists(checkpoint):
        return refit
    return Path(run_dir)
