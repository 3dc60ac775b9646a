"""The fit loop: epochs of batches, validation, early stopping, checkpoints, resume.

Determinism on CPU: an epoch's shuffle comes from its own generator seeded with
(seed, epoch); negatives come from one sampler generator, and dropout from the
global generator, whose states the checkpoint saves (with the mined negatives'
candidates, ``training/mining.py``, refreshed on a schedule of the step alone). So a
run resumed from its last checkpoint continues exactly as the uninterrupted run would
have.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from twotower.errors import ConfigError, DataError
from twotower.towers.model import TwoTower
from twotower.training.checkpoint import CheckpointStore
from twotower.training.config import TrainingConfig
from twotower.training.distributed import Collective
from twotower.training.evaluate import evaluate_model
from twotower.training.examples import Batch, TrainingExamples
from twotower.training.full_softmax import KnownPairs
from twotower.training.mining import negative_mining
from twotower.training.objectives import build_objective
from twotower.training.run_log import RunLog
from twotower.training.self_supervised import ItemSelfSupervision

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1

# Called after each epoch's validation, checkpoints and logs: (epoch, that epoch's record).
EpochCallback = Callable[[int, dict[str, Any]], None]


@dataclasses.dataclass
class RunState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    step: int = 0
    best: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: bool = False
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What the fit loop runs: the training options and each epoch's learning rate.

    Attributes:
        training: the training options.
        lrs: None: up to ``training.epochs`` epochs at ``epoch_lr``'s rates, each
            validated (early stopping and the best checkpoint follow
            ``training.metric``). A refit's plan: exactly these epochs at these learning
            rates, none validated, every epoch the best so far.
    """

    training: TrainingConfig
    lrs: tuple[float, ...] | None = None

    @property
    def validated(self) -> bool:
        """Whether each epoch is ranked on the validation part."""
        return self.lrs is None

    @property
    def epochs(self) -> int:
        """The most epochs the run trains."""
        return self.training.epochs if self.lrs is None else len(self.lrs)

    def lr(self, epoch: int, records: list[dict[str, Any]]) -> float:
        """The learning rate of ``epoch`` (1-based), given the records of those before."""
        if self.lrs is None:
            return epoch_lr(self.training, epoch, records)
        return self.lrs[epoch - 1]


def epoch_lr(config: TrainingConfig, epoch: int, records: list[dict[str, Any]]) -> float:
    """The learning rate of ``epoch`` (1-based) under ``config.lr_schedule``, given the
    records of the epochs before it (``config.metric`` in each, for ``plateau``)."""
    if config.lr_schedule == "cosine":
        return config.lr * (1.0 + math.cos(math.pi * (epoch - 1) / config.epochs)) / 2.0
    if config.lr_schedule == "plateau":
        best, worse = -math.inf, 0
        for record in records[: epoch - 1]:
            value = record[config.metric]
            best, worse = (value, worse) if value > best else (best, worse + 1)
        return config.lr * config.lr_factor**worse
    return config.lr


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when CUDA is available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device is 'cuda' but CUDA is not available here")
    return torch.device(name)


def sparse_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The tables with sparse gradients, by parameter name (a shared table once)."""
    sparse_ids = {
        id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse
    }
    return {name: p for name, p in model.named_parameters() if id(p) in sparse_ids}


def build_optimizers(model: torch.nn.Module, config: TrainingConfig) -> list[torch.optim.Optimizer]:
    """Adam/AdamW for dense parameters; SparseAdam/Adagrad for sparse-gradient tables."""
    sparse_ids = {id(p) for p in sparse_parameters(model).values()}
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    sparse = [p for p in model.parameters() if id(p) in sparse_ids]
    dense_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    optimizers: list[torch.optim.Optimizer] = []
    if dense:
        optimizers.append(dense_class(dense, lr=config.lr, weight_decay=config.weight_decay))
    if sparse:
        sparse_class = (
            torch.optim.SparseAdam
            if config.sparse_optimizer == "sparse_adam"
            else torch.optim.Adagrad
        )
        optimizers.append(sparse_class(sparse, lr=config.lr))
    return optimizers


def _known_pairs(config: TrainingConfig, data: TrainingExamples) -> KnownPairs | None:
    """The training (query, item) pairs, where the objective masks a query's known
    positives and the data has them all."""
    pairs = data.training_pairs() if getattr(config.objective, "mask_known", False) else None
    return None if pairs is None else KnownPairs(*pairs, data.num_items)


class _StepLoss(torch.nn.Module):
    """A batch's training loss as one module call, so DistributedDataParallel can wrap
    the model and the objective it runs; the examples say how their batch becomes a
    loss (``TrainingExamples.loss``), and the self-supervised item term, if any, is
    added to it."""

    def __init__(
        self,
        model: TwoTower,
        objective: torch.nn.Module,
        data: TrainingExamples,
        self_supervision: ItemSelfSupervision | None = None,
    ) -> None:
        super().__init__()
        self.model, self.objective, self.data = model, objective, data
        self.self_supervision = self_supervision

    def forward(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        loss = self.data.loss(self.model, self.objective, batch, generator)
        if self.self_supervision is not None:
            loss = loss + self.self_supervision(self.model, self.data, batch, generator)
        return loss


class Trainer:
    """Trains a ``TwoTower`` model on one split; writes checkpoints and logs to ``out``.

    Args:
        model: the model, on ``data.device``.
        data: the training examples and feature inputs; the ``valid`` part of its
            split is ranked after each epoch.
        plan: the training options and each epoch's learning rate (``RunPlan``).
        out: the run folder.
        seed: seeds the shuffles and the negative sampler.
        extra: JSON/tensor-ready values stored in every checkpoint (config, features).
        collective: the training processes (``torchrun``); with several, the model is
            wrapped in DistributedDataParallel, each process trains on its share of
            every global batch and rank 0 alone validates and writes.
        on_epoch: called with the epoch number and its record (``loss``, ``valid/...``)
            once the epoch is validated, checkpointed and logged; an exception it raises
            ends ``fit`` and propagates (a tuner prunes a trial so). Under ``torchrun``
            every rank calls it with the same record and must decide alike.
    """

    def __init__(
        self,
        model: TwoTower,
        data: TrainingExamples,
        plan: RunPlan,
        out: Path,
        seed: int,
        extra: dict[str, Any] | None = None,
        collective: Collective | None = None,
        on_epoch: EpochCallback | None = None,
    ) -> None:
        self.model, self.data, self.on_epoch = model, data, on_epoch
        self.plan, self.config = plan, plan.training
        self.out, self.seed, self.extra = Path(out), seed, extra or {}
        self.collective = collective or Collective()
        self.mining = negative_mining(self.config, data)
        self.objective = build_objective(
            self.config.objective,
            data.item_counts(),
            _known_pairs(self.config, data),
            self.collective,
            None if self.mining is None else self.mining.negatives,
            data.split.held_out_items,
        ).to(data.device)
        ssl = self.config.self_supervised
        self.step_loss: torch.nn.Module = _StepLoss(
            model, self.objective, data, ItemSelfSupervision(ssl, model) if ssl.on else None
        )
        # sparse gradients are averaged by Collective.average_sparse, not by DDP (see there)
        sparse = sparse_parameters(self.step_loss)
        self.sparse = list(sparse.values())
        if self.collective.distributed:
            on_gpu = data.device.type == "cuda"
            DDP = torch.nn.parallel.DistributedDataParallel
            DDP._set_params_and_buffers_to_ignore_for_model(self.step_loss, list(sparse))
            self.step_loss = DDP(self.step_loss, device_ids=[data.device] if on_gpu else None)
        self.optimizers = build_optimizers(model, self.config)
        self.sampler_generator = torch.Generator().manual_seed(seed + 1)
        self.store = CheckpointStore(self.out / "checkpoints")
        self.state = RunState()

    def fit(self, resume: bool = False) -> RunState:
        """Trains until the plan's epochs or early stopping; returns the final run state."""
        main = self.collective.is_main
        run_log = RunLog(self.out, self.config.tensorboard) if main else None
        if resume:
            self._restore()
        if run_log is not None:
            run_log.restart(self.state.records)
        try:
            while self.state.epoch < self.plan.epochs and not self.state.stopped:
                record = self._epoch(self.state.epoch + 1)
                self._end_epoch(record)
                if run_log is not None:
                    run_log.write(record, self.state.records, self.config.metric)
                if self.on_epoch is not None:
                    self.on_epoch(record["epoch"], record)
        finally:
            if run_log is not None:
                run_log.close()
        return self.state

    def _epoch(self, epoch: int) -> dict[str, Any]:
        """Trains one epoch, then validates (where the plan does); returns its record."""
        self.model.train()
        lr = self.plan.lr(epoch, self.state.records)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        clock = time.perf_counter()
        total, examples = self._train_epoch(epoch)
        seconds = time.perf_counter() - clock
        if self.collective.distributed:  # the epoch's figures over every rank's examples
            total, examples = self.collective.sum([total, float(examples)])
        record = {
            "epoch": epoch,
            "step": self.state.step,
            "loss": total / max(examples, 1),
            "examples_per_s": examples / max(seconds, 1e-9),
            "train_seconds": seconds,
            "lr": lr,
            "temperature": float(1.0 / self.model.scale()),
        }
        if self.collective.is_main and self.plan.validated:  # by group only at the end
            record.update(self.evaluate("valid", groups=False))
        return self.collective.broadcast(record)  # every rank stops at the same epoch

    def _train_epoch(self, epoch: int) -> tuple[float, int]:
        """One epoch's optimizer steps; returns this rank's summed loss and examples."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        total, examples, clock = 0.0, 0, time.perf_counter()
        world = self.collective.world_size
        batches = self.data.batches(self.config.batch_size, generator, self.collective)
        steps = self.data.steps(self.config.batch_size, world)
        if self.config.steps_per_epoch is not None:
            batches = itertools.islice(batches, self.config.steps_per_epoch)
            steps = min(steps, self.config.steps_per_epoch)
        quiet = None if self.collective.is_main else True
        bar = tqdm(batches, total=steps, desc=f"epoch {epoch}", unit="batch", disable=quiet)
        for index, batch in enumerate(bar):
            if self.mining is not None and self.mining.due(self.state.step, index == 0):
                self.mining.refresh(self.model)
            loss = self.train_step(batch)
            total += loss * len(batch.positives)
            examples += len(batch.positives)
            rate = examples * world / max(time.perf_counter() - clock, 1e-9)
            bar.set_postfix(loss=f"{loss:.4f}", ex_per_s=f"{rate:,.0f}")
        return total, examples

    def train_step(self, batch: Batch) -> float:
        """One optimizer step on a batch; returns its loss (this rank's rows' mean).

        With several processes the batch is this rank's share of the global batch;
        the loss is weighted so that the averaged gradient is that of the mean over
        the global batch, and a rank with no rows (the end of an epoch) still joins.
        """
        loss = self.step_loss(batch, self.sampler_generator)
        value = float(loss.detach())
        if self.collective.distributed:
            rows = len(batch.positives)
            weight = (
                rows * self.collective.world_size / sum(self.collective.sizes(rows, loss.device))
            )
            loss = loss * weight
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.collective.average_sparse(self.sparse)
        for optimizer in self.optimizers:
            optimizer.step()
        self.state.step += 1
        return value

    def evaluate(
        self, part: str, exclude_seen: bool = True, groups: bool = True
    ) -> dict[str, float]:
        """Full-corpus ranking metrics of the current model on ``valid`` or ``test``
        (``groups``: by item popularity and query activity group too)."""
        return evaluate_model(
            self.model,
            self.data,
            part,
            self.config.ks,
            exclude_seen=exclude_seen,
            batch_size=self.config.eval_batch_size,
            groups=groups,
        )

    def _end_epoch(self, record: dict[str, Any]) -> None:
        """Early-stopping bookkeeping, then the best and last checkpoints (in that order)."""
        state = self.state
        state.epoch = record["epoch"]
        state.records.append(record)
        # unvalidated (a refit), every epoch is the best so far
        value = record[self.config.metric] if self.plan.validated else float(state.epoch)
        if value > state.best:
            state.best, state.best_epoch, state.bad_epochs = value, state.epoch, 0
            if self.collective.is_main:
                best = {"model": self.model.state_dict(), "epoch": state.epoch, **self.extra}
                self.store.save("best", best, state.epoch)
        else:
            state.bad_epochs += 1
            state.stopped = 0 < self.config.patience <= state.bad_epochs
        if self.plan.validated:
            metric = self.config.metric
            log.info("epoch %d: loss %.4f, %s %.4f", state.epoch, record["loss"], metric, value)
        else:
            log.info("epoch %d: loss %.4f", state.epoch, record["loss"])
        if self.collective.is_main:
            self.store.save("last", self._checkpoint(), state.epoch)
        self.collective.barrier()  # no rank runs ahead of a checkpoint being written

    def _checkpoint(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "sampler": self.sampler_generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "version": CHECKPOINT_VERSION,
            "model": self.model.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "rng": rng,
            "state": dataclasses.asdict(self.state),
            **({} if self.mining is None else {"mining": self.mining.state_dict()}),
            **self.extra,
        }

    def _restore(self) -> None:
        checkpoint = self.store.load("last", map_location=self.data.device)
        if checkpoint.get("version") != CHECKPOINT_VERSION:
            raise DataError(
                f"{self.store.path('last')}: checkpoint version {checkpoint.get('version')} "
                f"is not {CHECKPOINT_VERSION}, the one this version of twotower reads"
            )
        self.model.load_state_dict(checkpoint["model"])
        self.objective.load_state_dict(checkpoint["objective"])
        if self.mining is not None and "mining" in checkpoint:
            self.mining.load_state_dict(checkpoint["mining"])
        for optimizer, saved in zip(self.optimizers, checkpoint["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        torch.set_rng_state(checkpoint["rng"]["torch"].cpu())
        self.sampler_generator.set_state(checkpoint["rng"]["sampler"].cpu())
        if "cuda" in checkpoint["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in checkpoint["rng"]["cuda"]])
        self.state = RunState(**checkpoint["state"])
        log.info("resumed after epoch %d (step %d)", self.state.epoch, self.state.step)
