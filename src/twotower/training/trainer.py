"""The fit loop: epochs of batches, validation, early stopping, checkpoints, resume.

Determinism on CPU: an epoch's shuffle comes from its own generator seeded with
(seed, epoch); negatives come from one sampler generator, and dropout from the
global generator, whose states the checkpoint saves. So a run resumed from its
last checkpoint continues exactly as the uninterrupted run would have.
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

import numpy as np
import torch
from tqdm.auto import tqdm

from twotower.errors import ConfigError, DataError
from twotower.evaluation.ranking import evaluate
from twotower.towers.model import TwoTower, interest_scores, select_interests
from twotower.training.checkpoint import CheckpointStore
from twotower.training.config import TrainingConfig
from twotower.training.data import Batch, TrainingExamples
from twotower.training.distributed import Collective
from twotower.training.objectives import (
    KnownPairs,
    SharedCandidates,
    build_objective,
    embed_unique,
)
from twotower.training.run_log import RunLog

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


@torch.inference_mode()
def embed_all(
    model: TwoTower, data: TrainingExamples, batch_size: int, part: str = "valid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, D) every query's vector as of ``part`` and (N, D) every item's, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        sides = []
        for tower, inputs, count in (
            (model.query_tower, lambda rows: data.query_inputs(rows, part), data.num_queries),
            (model.item_tower, data.item_inputs, data.num_items),
        ):
            rows = torch.arange(count, device=data.device)
            sides.append(torch.cat([tower(inputs(chunk)) for chunk in rows.split(batch_size)]))
    finally:
        model.train(was_training)
    return sides[0], sides[1]


def evaluate_model(
    model: TwoTower,
    data: TrainingExamples,
    part: str,
    ks: list[int] | tuple[int, ...],
    exclude_seen: bool = True,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Exact full-corpus metrics of a model on ``valid`` or ``test`` of ``data.split``.

    Every item is embedded once, every query with the history known at that step;
    scores are (B, N) inner products of unit vectors (the temperature does not
    change a ranking). ``popularity@k`` counts what is known before the step (not
    reported for streamed data).
    """
    queries, items = embed_all(model, data, batch_size, part)

    def score(chunk: np.ndarray) -> torch.Tensor:
        return interest_scores(queries[torch.from_numpy(chunk).to(queries.device)], items)

    return evaluate(
        score,
        data.split,
        part,
        len(queries),
        len(items),
        ks=ks,
        exclude_seen=exclude_seen,
        chunk_size=batch_size,
        item_popularity=data.popularity,
    )


def _known_pairs(config: TrainingConfig, data: TrainingExamples) -> KnownPairs | None:
    """The training (query, item) pairs, where the objective masks a query's known
    positives and the data has them all."""
    pairs = data.training_pairs() if getattr(config.objective, "mask_known", False) else None
    return None if pairs is None else KnownPairs(*pairs, data.num_items)


class _StepLoss(torch.nn.Module):
    """A batch's training loss as one module call, so DistributedDataParallel can wrap it."""

    def __init__(self, model: TwoTower, objective: torch.nn.Module, data: TrainingExamples) -> None:
        super().__init__()
        self.model, self.objective, self.data = model, objective, data

    def forward(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        tower = self.model.query_tower
        if batch.sequence is not None:
            query = tower.at_positions(batch.query, batch.sequence)  # (P, D)
        elif batch.owners is not None:  # query-level: B query rows, P positives
            return self.objective.sets(
                tower(batch.query),
                batch.positives,
                batch.owners,
                self.embed_items,
                self.model.scale(),
                batch.weights,
                batch.queries,
            )
        elif tower.interests == 1:
            query = tower(batch.query)  # (B, D)
        else:  # each row's positive is scored by the interest closest to it
            with torch.no_grad():
                targets = embed_unique(batch.positives, self.embed_items)  # (B, D)
            query = select_interests(tower(batch.query), targets)  # (B, K, D) -> (B, D)
        return self.objective(
            query,
            batch.positives,
            self.embed_items,
            self.model.scale(),
            generator,
            batch.weights,
            batch.queries,
        )

    def embed_items(self, items: torch.Tensor) -> torch.Tensor:
        """(M, D) vectors of (M,) item indices, through the item tower."""
        return self.model.item_tower(self.data.item_inputs(items))


class Trainer:
    """Trains a ``TwoTower`` model on one split; writes checkpoints and logs to ``out``.

    Args:
        model: the model, on ``data.device``.
        data: the training examples and feature inputs; the ``valid`` part of its
            split is ranked after each epoch.
        config: the training options.
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
        config: TrainingConfig,
        out: Path,
        seed: int,
        extra: dict[str, Any] | None = None,
        collective: Collective | None = None,
        on_epoch: EpochCallback | None = None,
        lrs: list[float] | None = None,
    ) -> None:
        self.model, self.data, self.on_epoch = model, data, on_epoch
        # a refit: these epochs' learning rates, no validation, every epoch the best
        self.lrs = lrs
        self.config, self.out, self.seed, self.extra = config, Path(out), seed, extra or {}
        self.collective = collective or Collective()
        self.objective = build_objective(
            config.objective, data.item_counts(), _known_pairs(config, data)
        ).to(data.device)
        if isinstance(self.objective, SharedCandidates):
            self.objective.collective = self.collective
        self.step_loss: torch.nn.Module = _StepLoss(model, self.objective, data)
        # sparse gradients are averaged by Collective.average_sparse, not by DDP (see there)
        sparse = sparse_parameters(self.step_loss)
        self.sparse = list(sparse.values())
        if self.collective.distributed:
            on_gpu = data.device.type == "cuda"
            DDP = torch.nn.parallel.DistributedDataParallel
            DDP._set_params_and_buffers_to_ignore_for_model(self.step_loss, list(sparse))
            self.step_loss = DDP(self.step_loss, device_ids=[data.device] if on_gpu else None)
        self.optimizers = build_optimizers(model, config)
        self.sampler_generator = torch.Generator().manual_seed(seed + 1)
        self.store = CheckpointStore(self.out / "checkpoints")
        self.state = RunState()

    def fit(self, resume: bool = False) -> RunState:
        """Trains until ``epochs`` or early stopping; returns the final run state."""
        main = self.collective.is_main
        run_log = RunLog(self.out, self.config.tensorboard) if main else None
        if resume:
            self._restore()
        if run_log is not None:
            run_log.restart(self.state.records)
        try:
            epochs = len(self.lrs) if self.lrs is not None else self.config.epochs
            while self.state.epoch < epochs and not self.state.stopped:
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
        """Trains one epoch, then validates; returns the epoch's record."""
        self.model.train()
        if self.lrs is not None:
            lr = self.lrs[epoch - 1]
        else:
            lr = epoch_lr(self.config, epoch, self.state.records)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
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
        for batch in bar:
            loss = self.train_step(batch)
            total += loss * len(batch.positives)
            examples += len(batch.positives)
            rate = examples * world / max(time.perf_counter() - clock, 1e-9)
            bar.set_postfix(loss=f"{loss:.4f}", ex_per_s=f"{rate:,.0f}")
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
        if self.collective.is_main and self.lrs is None:
            record.update(self.evaluate("valid"))
        return self.collective.broadcast(record)  # every rank stops at the same epoch

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

    def evaluate(self, part: str, exclude_seen: bool = True) -> dict[str, float]:
        """Full-corpus ranking metrics of the current model on ``valid`` or ``test``."""
        return evaluate_model(
            self.model,
            self.data,
            part,
            self.config.ks,
            exclude_seen=exclude_seen,
            batch_size=self.config.eval_batch_size,
        )

    def _end_epoch(self, record: dict[str, Any]) -> None:
        """Early-stopping bookkeeping, then the best and last checkpoints (in that order)."""
        state = self.state
        state.epoch = record["epoch"]
        state.records.append(record)
        value = record[self.config.metric] if self.lrs is None else float(state.epoch)
        if value > state.best:
            state.best, state.best_epoch, state.bad_epochs = value, state.epoch, 0
            if self.collective.is_main:
                best = {"model": self.model.state_dict(), "epoch": state.epoch, **self.extra}
                self.store.save("best", best, state.epoch)
        else:
            state.bad_epochs += 1
            state.stopped = 0 < self.config.patience <= state.bad_epochs
        log.info(
            "epoch %d: loss %.4f, %s %.4f", state.epoch, record["loss"], self.config.metric, value
        )
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
        for optimizer, saved in zip(self.optimizers, checkpoint["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        torch.set_rng_state(checkpoint["rng"]["torch"].cpu())
        self.sampler_generator.set_state(checkpoint["rng"]["sampler"].cpu())
        if "cuda" in checkpoint["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in checkpoint["rng"]["cuda"]])
        self.state = RunState(**checkpoint["state"])
        log.info("resumed after epoch %d (step %d)", self.state.epoch, self.state.step)
