"""A run that starts from an earlier run's model (``--init-from RUN``): a warm start.

model      the one the earlier run reports (``reported_model``: its best
           checkpoint, or its refit's where it refitted)
features   the earlier run's, grown with the new training examples
           (``FeaturePipeline.extend``: old codes kept, new values appended,
           statistics kept, histories rebuilt)
weights    every parameter copied as it is; an embedding table that gained rows
           (values new to its vocabulary) starts each new row as a copy of its
           out-of-vocabulary row, the vector the earlier model gave any unknown
           value: so before its first step the new model scores every input, old
           values or new, exactly as the earlier model did
optimizer  the earlier run's Adam (or Adagrad) state, where its last checkpoint is
           of the epoch whose model is carried and the optimizers are the same
           kinds; a grown table's moments gain zero rows (the state of a row no step
           has touched yet). Otherwise the optimizers start afresh. The learning-rate
           schedule always starts afresh: it follows the new run's epochs.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from twotower.config import Config
from twotower.config_io import to_dict
from twotower.errors import ConfigError, DataError
from twotower.features.growth import WEIGHTLESS, differences, feature_differences
from twotower.features.pipeline import FeaturePipeline
from twotower.features.transform import OOV
from twotower.storage import read_json, write_json
from twotower.towers.model import TwoTower
from twotower.training.checkpoint import CheckpointStore
from twotower.training.saved import SavedModel, read_saved, reported_model

log = logging.getLogger(__name__)

INIT_FILE = "init_from.json"  # in the run folder: what the run started from


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """An earlier run's model, read and checked against the new run's config.

    Attributes:
        run: the earlier run folder, as given.
        saved: the checkpoint of the model it reports.
        optimizers: the optimizer states to carry over, or None (start afresh).
        optimizer_note: why they are carried or not (recorded in ``INIT_FILE``).
    """

    run: Path
    saved: SavedModel
    optimizers: list[dict[str, Any]] | None
    optimizer_note: str

    @property
    def pipeline(self) -> FeaturePipeline:
        """The earlier run's fitted features, which the new run grows."""
        return self.saved.pipeline

    @classmethod
    def for_run(
        cls,
        out: Path,
        init_from: Path | None,
        resume: bool,
        config: Config,
        device: torch.device,
    ) -> WarmStart | None:
        """What the run ``out`` starts from: ``init_from``; None: scratch. A resumed run
        continues from its own checkpoint, so it needs the earlier run only for a refit
        still to come, and reads the one its ``INIT_FILE`` records.

        Raises:
            ConfigError: a resumed run given another ``init_from`` than it started from.
            DataError: the recorded run's model changed since (another SHA-256).
        """
        recorded_file = Path(out) / INIT_FILE
        recorded = read_json(recorded_file, "") if resume and recorded_file.is_file() else None
        started = None if recorded is None else Path(recorded["run"])
        if resume and init_from is not None and started != Path(init_from).resolve():
            raise ConfigError(
                f"{out}: cannot resume with --init-from {init_from}: the run started from "
                f"{started or 'scratch'}"
            )
        run = init_from
        if resume:  # its own checkpoint holds its start; a refit to come starts from there
            run = started if config.training.refit else None
        if run is None:
            return None
        warm = cls.read(run, config, device)
        if recorded is not None and warm.saved.sha256 != recorded["sha256"]:
            raise DataError(
                f"{out}: the model it started from ({warm.saved.path}) has changed since "
                f"(sha256 {warm.saved.sha256}, not {recorded['sha256']})"
            )
        return warm

    @classmethod
    def read(cls, run: Path, config: Config, device: torch.device) -> WarmStart:
        """Reads the model ``run`` reports and the optimizer state that goes with it.

        Raises:
            DataError: ``run`` is not a run folder with a trained model.
            ConfigError: its model or features differ from ``config``'s in more than
                ``growth.GROWABLE`` or ``growth.WEIGHTLESS`` settings (each named).
        """
        run = Path(run)
        if not CheckpointStore(run / "checkpoints").exists("best"):
            what = "no such folder" if not run.is_dir() else "no trained model in it"
            raise DataError(
                f"--init-from {run}: {what} (a run folder of twotower train, with "
                "checkpoints/best.json)"
            )
        folder = reported_model(run)
        saved = read_saved(folder, "best", map_location=device)
        _check_compatible(run, saved.config, config)
        optimizers, note = _optimizer_states(folder, saved, config, device)
        return cls(run, saved, optimizers, note)

    def initialise(self, model: TwoTower, optimizers: list[torch.optim.Optimizer]) -> None:
        """Loads the earlier weights into ``model`` (built on the grown features), grown
        where its tables grew, and the optimizer states into ``optimizers``."""
        model.load_state_dict(grown_weights(self.saved.state["model"], model))
        if self.optimizers is None:
            return
        for optimizer, saved in zip(optimizers, self.optimizers, strict=True):
            optimizer.load_state_dict(grown_optimizer_state(saved, optimizer))

    def record(self) -> dict[str, Any]:
        """What the new run started from: the run, the model's checkpoint and its
        SHA-256, its epoch, and what became of the optimizer state."""
        return {
            "run": str(self.run.resolve()),
            "checkpoint": str(self.saved.path.resolve()),
            "sha256": self.saved.sha256,
            "epoch": int(self.saved.state.get("epoch", 0)),
            "optimizer": self.optimizer_note,
        }


def record_start(out: Path, warm: WarmStart | None) -> None:
    """Writes what the run in ``out`` starts from (``INIT_FILE``: ``warm.record()``), or
    where it starts from scratch removes one an earlier attempt left."""
    path = Path(out) / INIT_FILE
    if warm is None:
        path.unlink(missing_ok=True)
    else:
        write_json(path, warm.record())


def _check_compatible(run: Path, old: Config, new: Config) -> None:
    """Refuses an earlier run whose model or features the new config cannot carry."""
    changed = feature_differences(old.features, new.features)
    changed += differences(to_dict(old.model), to_dict(new.model), "model", WEIGHTLESS)
    if changed:
        raise ConfigError(
            f"--init-from {run}: its model cannot be carried into this config's; they "
            f"differ in {', '.join(changed)}"
        )


def _optimizer_states(
    folder: Path, saved: SavedModel, config: Config, device: torch.device
) -> tuple[list[dict[str, Any]] | None, str]:
    """The earlier run's optimizer states where they go with the carried model, and a
    note of why they are carried or not."""
    old, new = saved.config.training, config.training
    if (old.optimizer, old.sparse_optimizer) != (new.optimizer, new.sparse_optimizer):
        return None, "reset: the optimizers are of other kinds"
    store = CheckpointStore(folder / "checkpoints")
    last = store.load("last", map_location=device) if store.exists("last") else {}
    epoch = saved.state.get("epoch")
    if last.get("state", {}).get("epoch") != epoch or "optimizers" not in last:
        # moments of a later epoch belong to other weights than those carried
        return None, f"reset: the last checkpoint is not of the carried epoch {epoch}"
    return last["optimizers"], f"carried from epoch {epoch}"


def grown_weights(old: dict[str, torch.Tensor], model: TwoTower) -> dict[str, torch.Tensor]:
    """The earlier weights in ``model``'s shapes: each copied as it is, but an
    embedding table that gained rows, whose new rows are copies of its
    out-of-vocabulary row (row 1).

    Raises:
        ConfigError: a weight is missing, new, or of another shape (each named).
    """
    tables = {
        f"{name}.weight"
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, torch.nn.Embedding)
    }
    target = model.state_dict()
    weights, problems = {}, sorted(f"{key} (not in this model)" for key in old.keys() - target)
    for key, new in target.items():
        before = old.get(key)
        if before is None:
            problems.append(f"{key} (not in the earlier model)")
        elif before.shape == new.shape:
            weights[key] = before
        elif key in tables and before.shape[1:] == new.shape[1:] and len(before) < len(new):
            added = before[OOV : OOV + 1].expand(len(new) - len(before), -1)
            weights[key] = torch.cat([before, added])
        else:
            problems.append(f"{key} ({tuple(before.shape)} vs {tuple(new.shape)})")
    if problems:
        raise ConfigError(f"the earlier weights do not fit this model: {', '.join(problems)}")
    return weights


def grown_optimizer_state(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer's saved state for ``optimizer``'s parameters: every moment as it
    was, a grown table's with zero rows appended; the hyperparameters (learning
    rate, weight decay) ``optimizer``'s own, as the new config sets them."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in saved["state"].items():
        param = params[int(index)]
        state[index] = {key: _zero_grown(value, param) for key, value in entry.items()}
    return {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}


def _zero_grown(value: Any, param: torch.Tensor) -> Any:
    """A per-element moment of a table that gained rows, with zero rows for them;
    anything else (a step count) as it is."""
    if not isinstance(value, torch.Tensor) or value.shape == param.shape or value.ndim == 0:
        return value
    added = value.new_zeros((len(param) - len(value), *value.shape[1:]))
    return torch.cat([value, added])
