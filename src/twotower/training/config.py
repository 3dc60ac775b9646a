"""The training part of the config: objective, optimizer, epochs, validation.

Kept apart from the trainer so the config can be read without building anything.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from twotower.training.objectives import InBatchConfig, ObjectiveConfig

HistoryRule = Literal["auto", "before_event", "mask_target"]


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """How the model is trained.

    Attributes:
        objective: the loss and its negatives (``kind``: pointwise, hinge, logistic,
            listwise, in_batch, mixed).
        epochs: at most this many passes over the training interactions.
        batch_size: interactions per step.
        optimizer: ``adam`` or ``adamw`` for dense parameters.
        lr: learning rate (every optimizer).
        weight_decay: for the dense optimizer.
        sparse_optimizer: ``sparse_adam`` or ``adagrad`` for embedding tables when
            ``model.sparse_embeddings`` is on.
        history: how history features avoid containing the example's own target.
        metric: the validation metric for early stopping and the best checkpoint.
        patience: stop after this many epochs without improvement (0: never).
        ks: the cutoffs validation reports.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        eval_batch_size: rows embedded, and queries ranked, at once when evaluating.
        tensorboard: also log to TensorBoard.
        steps_per_epoch: end an epoch (validate, checkpoint) after this many steps
            instead of after every interaction: for streams too long to wait for a
            whole pass. The next epoch starts a new shuffled pass. None: whole passes.
    """

    objective: ObjectiveConfig = dataclasses.field(default_factory=InBatchConfig)
    epochs: int = 10
    batch_size: int = 512
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    sparse_optimizer: Literal["sparse_adam", "adagrad"] = "sparse_adam"
    history: HistoryRule = "auto"
    metric: str = "valid/ndcg@10"
    patience: int = 3
    ks: list[int] = dataclasses.field(default_factory=lambda: [10, 50, 100])
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_batch_size: int = 1024
    tensorboard: bool = True
    steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs, batch_size and eval_batch_size must be >= 1")
        if not self.metric.startswith("valid/"):
            raise ValueError(f"metric must be a validation metric 'valid/...', got {self.metric!r}")
        name, _, k = self.metric.removeprefix("valid/").partition("@")
        if k and (not k.isdigit() or int(k) not in self.ks):
            raise ValueError(f"metric {self.metric!r}: its cutoff must be one of ks {self.ks}")
