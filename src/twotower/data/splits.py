"""Train / validation / test splits of the interactions, deterministic given a seed.

Methods:
    leave_last_out: per query, the last interaction is test and the one before it
        validation. "Last" is by timestamp; equal timestamps (or no timestamps at
        all) are ordered by position in the source, a later row counting as later.
        A query with 2 interactions gives train + test, with 1 only train.
    random: per query, a seeded shuffle cut by ``ratios`` (train, valid, test); a
        query with n interactions sends round(n * r_train) to train and
        round(n * (r_train + r_valid)) - round(n * r_train) to validation.
    time: one global cut-off; interactions at or after ``test_from`` are test,
        those in [``valid_from``, ``test_from``) validation. Without explicit
        cut-offs, they are the timestamps' quantiles at 1 - r_test - r_valid and
        1 - r_test.
    given: the user's own train / valid / test files (``data.valid``, ``data.test``).

Whatever the method, ``train_from`` marks a new period (incremental training, from a
previous run's model): the training interactions at or after it are the training
examples; those before it stay in ``train``, so histories and seen items still know
them, but are not trained on again.

Whatever the method, ``new_items`` (a share) holds some items out of training
entirely: they are drawn with ``seed`` among the items with at least
``new_items_min_count`` interactions, every interaction of theirs goes to test, and
the method splits the others as if the new items' interactions were not there. No
history, seen item or fitted vocabulary then knows a new item: it stays in the corpus
(the item table) and the item tower reaches it through its features alone, its id
reading as unknown, as a new id does at serving. ``new_items_valid`` holds out another
share the same way, drawn after them among the same items, every interaction of theirs
in validation: new items to choose settings on without reading test.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from twotower.data.config import SplitConfig
from twotower.data.dataset import ITEM_IDX, QUERY_IDX, SPLIT, TIMESTAMP, Dataset
from twotower.errors import DataError

TRAIN, VALID, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "valid", "test")
HELD_OUT = ("valid", "test")  # the parts a model is ranked on


def check_held_out(part: str) -> None:
    """Refuses a part that is neither ``valid`` nor ``test``."""
    if part not in HELD_OUT:
        raise ValueError(f"part must be 'valid' or 'test', got {part!r}")


@dataclasses.dataclass(frozen=True)
class Split:
    """The interactions of each part, each a subset of ``Dataset.interactions``.

    Attributes:
        train, valid, test: each part's interactions; ``train`` is every interaction
            known before validation (what histories and seen items hold).
        examples: (E,) int64 the rows of ``train`` that are training examples, in
            order (``split.train_from``); None: every row of ``train``.
        new_items: (M,) int64 the item indices held out of training, sorted, whose
            interactions are all in ``test`` (``split.new_items``); None: none.
        new_items_valid: (M',) int64 the same, whose interactions are all in ``valid``
            (``split.new_items_valid``); None: none.
    """

    train: pa.Table
    valid: pa.Table
    test: pa.Table
    examples: np.ndarray | None = None
    new_items: np.ndarray | None = None
    new_items_valid: np.ndarray | None = None

    def part(self, name: str) -> pa.Table:
        return getattr(self, name)

    def new_items_in(self, part: str) -> np.ndarray | None:
        """(M,) the new items whose held-out pairs ``part`` holds, else None."""
        return self.new_items if part == "test" else self.new_items_valid

    @property
    def held_out_items(self) -> np.ndarray | None:
        """(M,) int64 sorted: every item held out of training (test's new items and
        validation's), which training must not know, not even as a negative; None: none."""
        held = [items for items in (self.new_items, self.new_items_valid) if items is not None]
        return np.sort(np.concatenate(held)) if held else None

    @property
    def training_examples(self) -> pa.Table:
        """The training interactions that are examples (all of ``train`` but for a
        ``train_from``), which the features are fitted on."""
        return self.train if self.examples is None else self.train.take(pa.array(self.examples))

    def with_valid_in_train(self) -> Split:
        """Training and validation interactions as training (validation's all examples),
        no validation, the same test: ``training.refit``'s split (validation's new items
        are then trained on: none is held out of training but test's)."""
        train = pa.concat_tables([self.train, self.valid], promote_options="default")
        examples = self.examples
        if examples is not None:
            more = np.arange(self.train.num_rows, train.num_rows, dtype=np.int64)
            examples = np.concatenate([examples, more])
        return Split(train, self.valid.slice(0, 0), self.test, examples, self.new_items)


def split_interactions(dataset: Dataset, config: SplitConfig) -> Split:
    """Assigns each interaction to train, validation or test.

    Raises:
        DataError: the method needs timestamps or given files that are absent, no item
            can be drawn as new, or a part would be left without any interaction.
    """
    new_items, new_valid = draw_new_items(dataset, config)
    part = _parts(dataset, config, new_items, new_valid)
    tables = {name: dataset.interactions.filter(part == i) for i, name in enumerate(SPLIT_NAMES)}
    for name, table in tables.items():
        if table.num_rows == 0:
            raise DataError(
                f"{dataset.name}: the {name} split has no interactions after splitting "
                f"with method {config.method!r}"
            )
    examples = None
    if config.train_from is not None:
        examples = _examples_from(dataset, part, config.train_from)
    return Split(**tables, examples=examples, new_items=new_items, new_items_valid=new_valid)


def _parts(
    dataset: Dataset,
    config: SplitConfig,
    new_items: np.ndarray | None,
    new_valid: np.ndarray | None,
) -> np.ndarray:
    """(I,) int8 each interaction's part: the method's; with ``new_items``, theirs are
    test, with ``new_valid`` theirs validation, and the method splits the others as if
    theirs were not there."""
    assign = {
        "leave_last_out": _leave_last_out,
        "random": _random,
        "time": _time,
        "given": _given,
    }[config.method]
    if new_items is None and new_valid is None:
        return assign(dataset, config)
    items = dataset.column(ITEM_IDX)
    part = np.full(len(items), -1, dtype=np.int8)
    for new, held_in in ((new_items, TEST), (new_valid, VALID)):
        if new is not None:
            part[np.isin(items, new)] = held_in
    held = part >= 0
    others = dataclasses.replace(dataset, interactions=dataset.interactions.filter(~held))
    part[~held] = assign(others, config)
    return part


def draw_new_items(
    dataset: Dataset, config: SplitConfig
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(M,) and (M',) int64 sorted: the items ``split.new_items`` holds out of training
    for test and those ``split.new_items_valid`` holds out for validation (None: none).

    Each count is its share of the items with at least ``new_items_min_count``
    interactions, rounded, and at least 1. Test's are drawn first with ``config.seed``,
    so a seed draws the same ones whatever the method and whether validation has new
    items too; validation's are drawn after them, among the items left.

    Raises:
        DataError: no item has that many interactions, or too few for both shares.
    """
    if not config.holds_new_items:
        return None, None
    counts = np.bincount(dataset.column(ITEM_IDX), minlength=dataset.num_items)
    eligible = np.flatnonzero(counts >= config.new_items_min_count)
    if len(eligible) == 0:
        raise DataError(
            f"{dataset.name}: split.new_items draws among the items with at least "
            f"{config.new_items_min_count} interactions (split.new_items_min_count), "
            "and there are none"
        )
    rng = np.random.default_rng(config.seed)
    shares = (config.new_items, config.new_items_valid)
    sizes = [max(1, round(share * len(eligible))) if share > 0 else 0 for share in shares]
    if sum(sizes) > len(eligible):
        raise DataError(
            f"{dataset.name}: split.new_items and new_items_valid draw {sizes[0]} and "
            f"{sizes[1]} items, more than the {len(eligible)} with at least "
            f"{config.new_items_min_count} interactions (split.new_items_min_count)"
        )
    drawn: list[np.ndarray | None] = []
    for size in sizes:
        new = np.sort(rng.choice(eligible, size=size, replace=False)).astype(np.int64)
        drawn.append(new if size else None)
        eligible = np.setdiff1d(eligible, new)
    return drawn[0], drawn[1]


def _examples_from(dataset: Dataset, part: np.ndarray, train_from: float) -> np.ndarray:
    """(E,) the rows of the training part at or after ``train_from``, as rows of it."""
    if not dataset.has_timestamps:
        raise DataError(
            f"{dataset.name}: split.train_from picks the training examples by timestamp, "
            "but the interactions have no timestamp column"
        )
    times = dataset.column(TIMESTAMP)[part == TRAIN].astype(np.float64)
    examples = np.flatnonzero(times >= train_from).astype(np.int64)
    if len(examples) == 0:
        raise DataError(
            f"{dataset.name}: no training interaction at or after split.train_from "
            f"({train_from}); the training interactions run from {times.min()} to {times.max()}"
        )
    return examples


def recency_order(query: np.ndarray, timestamps: np.ndarray | None) -> np.ndarray:
    """Row order grouping each query's interactions, oldest first.

    The one rule for "later" that splits and history features share: by timestamp,
    then by position in the source (a later row counts as later).
    """
    keys = [np.arange(len(query))]
    if timestamps is not None:
        keys.append(timestamps)
    keys.append(query)
    return np.lexsort(keys)


def _rank_in_runs(sorted_query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by query: each row's rank within its query, and that query's count."""
    starts = np.flatnonzero(np.r_[True, sorted_query[1:] != sorted_query[:-1]])
    counts = np.diff(np.r_[starts, len(sorted_query)])
    rank = np.arange(len(sorted_query)) - np.repeat(starts, counts)
    return rank, np.repeat(counts, counts)


def _leave_last_out(dataset: Dataset, config: SplitConfig) -> np.ndarray:
    timestamps = dataset.column(TIMESTAMP) if dataset.has_timestamps else None
    query = dataset.column(QUERY_IDX)
    order = recency_order(query, timestamps)
    rank, count = _rank_in_runs(query[order])  # rank 0 = the query's earliest
    from_end = count - 1 - rank
    part_sorted = np.full(len(order), TRAIN, dtype=np.int8)
    part_sorted[from_end == 0] = TEST
    part_sorted[(from_end == 1) & (count >= 3)] = VALID
    part_sorted[(from_end == 0) & (count == 1)] = TRAIN
    part = np.empty_like(part_sorted)
    part[order] = part_sorted
    return part


def _random(dataset: Dataset, config: SplitConfig) -> np.ndarray:
    query = dataset.column(QUERY_IDX)
    rng = np.random.default_rng(config.seed)
    order = np.lexsort((rng.random(len(query)), query))
    rank, n = _rank_in_runs(query[order])
    cut_train = np.round(n * config.ratios[0])
    cut_valid = np.round(n * (config.ratios[0] + config.ratios[1]))
    part_sorted = np.where(rank < cut_train, TRAIN, np.where(rank < cut_valid, VALID, TEST))
    part = np.empty(len(query), dtype=np.int8)
    part[order] = part_sorted
    return part


def _time(dataset: Dataset, config: SplitConfig) -> np.ndarray:
    if not dataset.has_timestamps:
        raise DataError(f"{dataset.name}: split method 'time' needs a timestamp column")
    t = dataset.column(TIMESTAMP).astype(np.float64)
    _, r_valid, r_test = config.ratios
    test_from = config.test_from
    valid_from = config.valid_from
    if test_from is None:
        test_from = float(np.quantile(t, 1 - r_test))
    if valid_from is None:
        valid_from = float(np.quantile(t, 1 - r_test - r_valid))
    if valid_from > test_from:
        raise DataError(f"split: valid_from ({valid_from}) is after test_from ({test_from})")
    return np.where(t >= test_from, TEST, np.where(t >= valid_from, VALID, TRAIN)).astype(np.int8)


def _given(dataset: Dataset, config: SplitConfig) -> np.ndarray:
    if SPLIT not in dataset.interactions.column_names:
        raise DataError(
            "split method 'given' needs your own files: set data.valid and data.test "
            "beside data.interactions"
        )
    return dataset.column(SPLIT).astype(np.int8)
