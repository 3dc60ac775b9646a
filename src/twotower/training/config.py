"""The training part of the config: objective, optimizer, epochs, validation.

Kept apart from the trainer and the objectives so the config can be read without
importing them: this module imports only the standard library.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

SamplerName = Literal["uniform", "popularity"]
FrequencyName = Literal["counts", "streaming", "none"]


@dataclasses.dataclass(frozen=True)
class MiningConfig:
    """Hard negatives mined from the model's own ranking, mixed with the sampled ones.

    Every ``every`` steps the current model ranks the whole corpus for each training
    query, its training positives left out; the items at ranks ``window`` (1-based,
    both ends included) become that query's candidates, and ``ratio`` of each row's
    sampled negatives are drawn uniformly from its query's candidates (the rest from
    the objective's sampler). Before the first refresh every negative is sampled.

    Attributes:
        ratio: the share of the sampled negatives drawn from the mined candidates
            (rounded half up to a count); 0 turns mining off.
        window: the first and last rank (1-based) of the candidates.
        every: steps between two refreshes, or ``epoch``: at the start of each epoch.
        warmup: steps trained on sampled negatives alone before the first refresh;
            None: one period (``every`` steps, or one epoch).
        max_candidates: the most (query, candidate) cells held: queries x window
            width, 4 bytes each (int32); a larger table is refused.
    """

    ratio: float = 0.0
    window: tuple[int, int] = (101, 500)
    every: int | Literal["epoch"] = "epoch"
    warmup: int | None = None
    max_candidates: int = 50_000_000

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"mined_negatives.ratio must be in [0, 1], got {self.ratio}")
        if len(self.window) != 2 or not 1 <= self.window[0] <= self.window[1]:
            raise ValueError(
                "mined_negatives.window must be [first, last] ranks with "
                f"1 <= first <= last, got {list(self.window)}"
            )
        if self.every != "epoch" and self.every < 1:
            raise ValueError(f"mined_negatives.every must be >= 1 or 'epoch', got {self.every}")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"mined_negatives.warmup must be >= 0, got {self.warmup}")
        if self.max_candidates < 1:
            raise ValueError("mined_negatives.max_candidates must be >= 1")

    @property
    def enabled(self) -> bool:
        """Whether any negative is mined."""
        return self.ratio > 0

    def share(self, negatives: int) -> int:
        """How many of ``negatives`` sampled negatives a row draws from its candidates."""
        return int(self.ratio * negatives + 0.5)

    def check(self, negatives: int, what: str) -> None:
        """Raises ValueError where mining is on but ``ratio`` of ``negatives`` (the
        objective's ``what``) rounds to no mined negative."""
        if self.enabled and self.share(negatives) == 0:
            raise ValueError(
                f"mined_negatives.ratio={self.ratio} of {what}={negatives} rounds to no "
                "mined negative: raise the ratio or the negatives"
            )


# Why a stream cannot feed mined negatives (the objective and the mining raise it).
MINING_REFUSAL = (
    "training.objective.mined_negatives ranks the corpus for every training query, "
    "which in-memory training data has and a stream does not"
)


def _refused(mining: MiningConfig, kind: str, why: str) -> None:
    """Raises ValueError where an objective that cannot take mined negatives is given some."""
    if mining.enabled:
        raise ValueError(
            f"the {kind} objective takes no mined negatives ({why}); mined_negatives "
            "apply to pointwise, hinge, logistic, listwise and mixed"
        )


@dataclasses.dataclass(frozen=True)
class SampledNegatives:
    """Per-row negatives, shared by the pointwise, pairwise and listwise objectives.

    Attributes:
        sampler: ``uniform`` over the corpus or ``popularity`` (count^alpha).
        alpha: the popularity exponent.
        num_negatives: negatives drawn for each positive (each objective sets its default).
        mined_negatives: the share of them mined from the model's ranking (off by
            default; ``MiningConfig``).
    """

    sampler: SamplerName = "uniform"
    alpha: float = 0.75
    num_negatives: int = 1
    mined_negatives: MiningConfig = dataclasses.field(default_factory=MiningConfig)

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.num_negatives < 1:
            raise ValueError(
                f"need alpha >= 0 and num_negatives >= 1, got alpha={self.alpha}, "
                f"num_negatives={self.num_negatives}"
            )
        self.mined_negatives.check(self.num_negatives, "num_negatives")


@dataclasses.dataclass(frozen=True)
class PointwiseConfig(SampledNegatives):
    """Each positive with ``num_negatives`` sampled negatives; binary cross-entropy."""

    # the name this field had before it was unified with the other objectives'
    RENAMED: ClassVar[dict[str, str]] = {"neg_per_pos": "num_negatives"}

    kind: Literal["pointwise"] = "pointwise"
    num_negatives: int = 2


@dataclasses.dataclass(frozen=True)
class HingeConfig(SampledNegatives):
    """Triplets (q, i+, i-) with ``num_negatives`` negatives per positive; hinge with margin."""

    kind: Literal["hinge"] = "hinge"
    margin: float = 0.5
    num_negatives: int = 4


@dataclasses.dataclass(frozen=True)
class LogisticConfig(SampledNegatives):
    """Triplets with a logistic (soft) hinge of sharpness ``sigma``."""

    kind: Literal["logistic"] = "logistic"
    sigma: float = 10.0
    num_negatives: int = 4


@dataclasses.dataclass(frozen=True)
class ListwiseConfig(SampledNegatives):
    """One positive and ``num_negatives`` sampled negatives in one softmax."""

    kind: Literal["listwise"] = "listwise"
    num_negatives: int = 16


@dataclasses.dataclass(frozen=True)
class SoftmaxCorrections:
    """The corrections of the shared-candidate softmax objectives.

    Attributes:
        logq: the sampling-probability estimate subtracted from the logits:
            ``counts`` (training counts), ``streaming`` (Yi et al. 2019) or ``none``.
        mask_hits: mask a candidate equal to the row's positive (the item twice).
        mask_known: also mask a candidate that is any other training positive of the
            row's query (in-memory training data).
        hard_negatives: if > 0, keep only this many highest-scoring negatives per row.
        streaming_buckets: hash buckets of the streaming frequency estimate.
        mined_negatives: ``mixed`` only: the share of its ``num_sampled`` negatives
            mined from the model's ranking, per row (``MiningConfig``).
    """

    logq: FrequencyName = "counts"
    mask_hits: bool = True
    mask_known: bool = False
    hard_negatives: int = 0
    streaming_buckets: int = 1 << 20
    mined_negatives: MiningConfig = dataclasses.field(default_factory=MiningConfig)

    def __post_init__(self) -> None:
        if self.hard_negatives < 0 or self.streaming_buckets < 1:
            raise ValueError("need hard_negatives >= 0 and streaming_buckets >= 1")


@dataclasses.dataclass(frozen=True)
class InBatchConfig(SoftmaxCorrections):
    """In-batch softmax: the batch's positives are every row's candidates."""

    kind: Literal["in_batch"] = "in_batch"

    def __post_init__(self) -> None:
        super().__post_init__()
        _refused(self.mined_negatives, "in_batch", "it samples none; mixed does")


@dataclasses.dataclass(frozen=True)
class MixedConfig(SoftmaxCorrections):
    """In-batch plus ``num_sampled`` uniformly drawn corpus items (Yang et al. 2020)."""

    kind: Literal["mixed"] = "mixed"
    num_sampled: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        self.mined_negatives.check(self.num_sampled, "num_sampled")


@dataclasses.dataclass(frozen=True)
class FullConfig:
    """Softmax over the whole corpus: every step scores every item, exactly.

    No sampling, so no logQ correction and no accidental hits: the ceiling the sampled
    softmax objectives approach, and a strong objective where the corpus is small.
    Each step runs the item tower on every item and holds (batch, N) scores.

    Attributes:
        max_items: the largest corpus it accepts; a larger one is refused when the
            objective is built (raise it knowingly: a step costs N item-tower rows).
        mask_known: leave the row's query's other training positives out of its
            softmax (in-memory training data), as ``SoftmaxCorrections.mask_known``.
        positives_compete: with ``mask_known`` in query-level training
            (``training.examples: queries``): a query's held-out positives stay in one
            another's softmax (the multinomial likelihood of Mult-DAE / Mult-VAE), and
            only its other training items (its input) are left out. False: each
            positive competes with none of the query's training items.
        mask_seen: in sequence training (``training.examples: sequences``): leave out
            of each position's softmax the items its query interacted with before that
            position's target (what evaluation leaves out as seen at that moment), the
            target itself always kept. Items after the position stay in: they are the
            next items a next-item model is meant to rank.
        chunk_rows: score this many rows (positions, queries) against the corpus at a
            time and score each chunk again in the backward pass, so a step holds
            ``chunk_rows`` x N scores instead of rows x N, for one more (chunk, N)
            product per chunk; None: every row at once. The loss is the same.
        mined_negatives: refused (every item is already a negative); present so that
            a config naming it is told why.
    """

    kind: Literal["full"] = "full"
    max_items: int = 100_000
    mask_known: bool = False
    positives_compete: bool = False
    mask_seen: bool = False
    chunk_rows: int | None = None
    mined_negatives: MiningConfig = dataclasses.field(default_factory=MiningConfig)

    def __post_init__(self) -> None:
        _refused(self.mined_negatives, "full", "every item is already a negative")
        if self.max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {self.max_items}")
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1 (or unset: all rows), got {self.chunk_rows}")
        if self.positives_compete and not self.mask_known:
            raise ValueError(
                "positives_compete changes what mask_known leaves out; without mask_known "
                "every item already competes"
            )
        if self.mask_seen and self.mask_known:
            raise ValueError(
                "mask_known already leaves out every training item of the query, the ones "
                "before each position (mask_seen) among them: choose one"
            )


ObjectiveConfig = (
    PointwiseConfig
    | HingeConfig
    | LogisticConfig
    | ListwiseConfig
    | InBatchConfig
    | MixedConfig
    | FullConfig
)


HistoryRule = Literal["auto", "before_event", "mask_target"]
WeightRule = Literal["none", "raw", "log1p", "capped"]
ExampleKind = Literal["interactions", "queries", "sequences"]

# Why a stream cannot feed what ``TrainingConfig.in_memory_only`` names (written once:
# the config check and the example builders raise it).
STREAM_REFUSAL = (
    "training.examples=queries or sequences and training.refit gather each query's whole "
    "training history, which a stream does not hold: train them in memory"
)


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """How the model is trained.

    Attributes:
        objective: the loss and its negatives (``kind``: pointwise, hinge, logistic,
            listwise, in_batch, mixed, full).
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
        position_weights: in sequence training (``examples: sequences``), ``query``:
            each query's positions share one weight, so long histories do not swamp
            short ones; ``position``: every position counts alike. In query-level
            training (``examples: queries``) the same for a query's held-out items.
        examples: what one training example is (``twotower.training.examples``):
            ``interactions``: one per training interaction (the query's history
            without its target); in memory or streamed. ``sequences``: every prefix of
            each query's training items, trained in one forward pass of a
            sequence-encoded history (``transformer``, ``gru``; SASRec): position t
            predicts item t + 1, and a batch holds about ``batch_size`` positions.
            Needs the ``in_batch``, ``mixed`` or ``full`` objective (``full``: every
            position against the whole corpus, SASRec's cross-entropy). ``queries``:
            one per query, each of its training items held out of its history input
            with probability ``holdout`` (drawn afresh every epoch) and the held-out
            ones its positives.
            Needs the ``full`` objective and one pooled history feature;
            ``batch_size`` then counts queries. ``sequences`` and ``queries`` gather
            each query's whole training history: in memory only. (The old
            ``one_pass: true`` is read as ``examples: sequences``, with a warning.)
        holdout: the probability of holding an item out, in query-level training.
        weights: how an interaction's ``weight`` column (a rating, a watch time, a
            count) weighs its example in the loss, for every objective: ``none``
            (alike), ``raw`` (the weight itself), ``log1p`` (log(1 + weight), for
            heavy-tailed counts) or ``capped`` (min(weight, ``weight_cap``)).
        weight_cap: the cap of ``capped``.
        lr_schedule: the learning rate of each epoch: ``constant`` (``lr`` throughout),
            ``cosine`` (from ``lr`` at epoch 1 down a half cosine over ``epochs``:
            ``lr * (1 + cos(pi * (e - 1) / epochs)) / 2``) or ``plateau`` (``lr`` times
            ``lr_factor`` for every earlier epoch that did not improve ``metric``). It
            follows from the epoch and the validation record alone, so a resumed run
            takes up the same rates.
        lr_factor: ``plateau``'s factor, in (0, 1).
        refit: after training, train the model again from scratch on train +
            validation for the best epoch's number of epochs, at the same learning
            rates, and report test metrics of that model (validation metrics stay the
            first model's): the footing of the baselines, which are refitted on train +
            validation for test. The refitted run is ``RUN_DIR/refit``. In memory only.
    """

    # read before ``examples`` said what an example is: one_pass: true was sequences
    RENAMED: ClassVar[dict[str, tuple[str, dict[bool, str]]]] = {
        "one_pass": ("examples", {True: "sequences", False: "interactions"})
    }

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
    position_weights: Literal["query", "position"] = "query"
    examples: ExampleKind = "interactions"
    holdout: float = 0.5
    weights: WeightRule = "none"
    weight_cap: float = 5.0
    lr_schedule: Literal["constant", "cosine", "plateau"] = "constant"
    lr_factor: float = 0.5
    refit: bool = False

    def __post_init__(self) -> None:
        if not self.weight_cap > 0:
            raise ValueError(f"weight_cap must be > 0, got {self.weight_cap}")
        if not 0.0 < self.lr_factor < 1.0:
            raise ValueError(f"lr_factor must be in (0, 1), got {self.lr_factor}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        self._check_examples()
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs, batch_size and eval_batch_size must be >= 1")
        if not self.metric.startswith("valid/"):
            raise ValueError(f"metric must be a validation metric 'valid/...', got {self.metric!r}")
        name, _, k = self.metric.removeprefix("valid/").partition("@")
        if k and (not k.isdigit() or int(k) not in self.ks):
            raise ValueError(f"metric {self.metric!r}: its cutoff must be one of ks {self.ks}")

    def _check_examples(self) -> None:
        """Refuses an objective that ``examples`` cannot train with, or an objective
        setting that has no meaning for it."""
        kind = self.objective.kind
        if self.examples != "interactions" and self.objective.mined_negatives.enabled:
            raise ValueError(
                "mined_negatives rank the corpus for the queries of per-interaction "
                f"examples: examples={self.examples!r} takes none (use interactions)"
            )
        if self.examples == "sequences" and kind not in ("in_batch", "mixed", "full"):
            raise ValueError(
                "examples=sequences trains with the in_batch, mixed or full objective, "
                f"not {kind!r}"
            )
        if self.examples == "queries" and kind != "full":
            raise ValueError(
                "examples=queries trains each query's held-out items against the whole "
                f"corpus: it needs the full objective (not {kind!r})"
            )
        if getattr(self.objective, "mask_seen", False) and self.examples != "sequences":
            raise ValueError(
                "objective.mask_seen leaves out the items before each position of a query's "
                f"sequence: it needs examples=sequences (not {self.examples!r}; mask_known "
                "leaves out all of a query's training items)"
            )
        if getattr(self.objective, "positives_compete", False) and self.examples == "sequences":
            raise ValueError(
                "objective.positives_compete lets a query's held-out positives compete "
                "(examples=queries); a sequence position has one positive"
            )

    @property
    def in_memory_only(self) -> bool:
        """Whether training gathers each query's whole training history (query-level or
        sequence examples, a refit), which only data held in memory has."""
        return self.examples != "interactions" or self.refit
