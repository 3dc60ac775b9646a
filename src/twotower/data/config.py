"""The data part of the config: where the tables are, how they are read and split.

Kept apart from the readers so a config can be read without importing them: this
module imports only the standard library.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

MissingRows = Literal["error", "impute", "drop"]


@dataclasses.dataclass(frozen=True)
class PlantedClusters:
    """The latent structure both synthetic generators plant: clustered users and items
    and a long tail of item popularity.

    Attributes:
        num_items: number of items.
        num_clusters: number of latent clusters.
        affinity: how strongly clusters drive the choice (vs. popularity).
        popularity_exponent: Zipf exponent of the item popularity tail.
        seed: random seed; the same seed gives the same data.
    """

    num_items: int = 1000
    num_clusters: int = 8
    affinity: float = 10.0
    popularity_exponent: float = 0.9
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class SyntheticConfig(PlantedClusters):
    """Settings of the in-memory generator (``data.source: synthetic``).

    Attributes:
        num_queries: number of users.
        interactions_per_query: mean interactions per user (at least 5 each).
        num_items, num_clusters, affinity, popularity_exponent, seed: as in
            ``PlantedClusters``.
    """

    num_queries: int = 2000
    interactions_per_query: int = 20

    def __post_init__(self) -> None:
        if min(self.num_queries, self.num_items, self.num_clusters) < 1:
            raise ValueError("num_queries, num_items and num_clusters must be positive")
        if self.interactions_per_query < 5 or self.interactions_per_query > self.num_items:
            raise ValueError("interactions_per_query must be between 5 and num_items")


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """Where a table lives and how to parse it.

    Attributes:
        path: a CSV file, a Parquet file, or a folder of Parquet files.
        format: ``auto`` chooses by extension (``.parquet``/``.pq``/folder: Parquet).
        delimiter: CSV field separator; may be several characters (``"::"``).
        header: whether the first CSV line holds the column names.
        columns: the column names when the file has no header.
        encoding: the CSV text encoding (``latin-1`` for the MovieLens files).
        quote_char: the CSV quote character, or None for none. A multi-character
            delimiter is replaced before parsing and so cannot be quoted: such
            files are read without quoting.
        skip_bad_rows: drop malformed rows and report how many, instead of failing.
    """

    path: Path
    format: Literal["auto", "csv", "parquet"] = "auto"
    delimiter: str = ","
    header: bool = True
    columns: list[str] | None = None
    encoding: str = "utf-8"
    quote_char: str | None = '"'
    skip_bad_rows: bool = False

    def __post_init__(self) -> None:
        if not self.delimiter:
            raise ValueError("delimiter must not be empty")
        if not self.header and not self.columns:
            raise ValueError(f"{self.path}: a file without a header needs 'columns'")

    @property
    def is_parquet(self) -> bool:
        if self.format != "auto":
            return self.format == "parquet"
        return self.path.is_dir() or self.path.suffix.lower() in (".parquet", ".pq")


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """Training interactions streamed from Parquet (``data.source: stream``).

    The interaction rows carry the query side's feature columns themselves (the
    form logs take: one row per event, with the user's features as of then); items
    come from ``items``, the corpus, which is held in memory.

    Attributes:
        built: a ``twotower data build`` folder: its parts, corpus, columns and fitted
            features stand for ``train``, ``valid``, ``test``, ``items``, ``query_id``,
            ``item_id`` and ``weight``, which are then left unset.
        train: a Parquet file or a folder of them: the training interactions.
        valid: the validation interactions (same columns), ranked after each epoch.
        test: the test interactions, ranked once at the end.
        items: the item feature table (the retrieval corpus): a Parquet file.
        query_id: the query (user) key column of the interaction rows.
        item_id: the item key column, of the interaction rows and of ``items``.
        buffer_rows: the shuffle buffer, in rows, per reading process.
        workers: DataLoader worker processes reading and transforming batches.
        eval_queries: rank at most this many held-out queries (a seeded sample).
        max_distinct: counters per categorical feature when fitting from the stream;
            past it counts are approximate (``twotower.features.streaming``).
        max_sample: values kept per bucketized feature when fitting quantiles.
        unknown_items: an interaction whose item is not in ``items``: ``error`` or
            ``drop`` (counted and logged).
        weight: the interaction rows' weight column (a rating, a watch time), which
            ``training.weights`` reads; None: none.
    """

    built: Path | None = None
    train: Path | None = None
    valid: Path | None = None
    test: Path | None = None
    items: Path | None = None
    query_id: str = "user_id"
    item_id: str = "item_id"
    buffer_rows: int = 200_000
    workers: int = 1
    eval_queries: int = 20_000
    max_distinct: int = 5_000_000
    max_sample: int = 1_000_000
    unknown_items: Literal["error", "drop"] = "error"
    weight: str | None = None

    def __post_init__(self) -> None:
        files = {"train": self.train, "valid": self.valid, "test": self.test, "items": self.items}
        if self.built is not None:
            given = [name for name, path in files.items() if path is not None]
            if given:
                raise ValueError(f"data.stream.built stands for {', '.join(given)}: drop them")
        elif None in files.values():
            missing = [name for name, path in files.items() if path is None]
            raise ValueError(
                f"data.stream needs {', '.join(missing)} (or built: a data build folder)"
            )
        if min(self.buffer_rows, self.eval_queries, self.max_distinct, self.max_sample) < 1:
            raise ValueError("buffer_rows, eval_queries, max_distinct and max_sample must be >= 1")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")


@dataclasses.dataclass(frozen=True)
class InteractionsConfig(TableSpec):
    """The interactions file and which of its columns play which role.

    Attributes:
        query_id: the column holding the query (user) id.
        item_id: the column holding the item id.
        timestamp: the time column, if any (numbers or Arrow timestamps).
        weight: a label / rating / weight column, if any.
    """

    query_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str | None = None
    weight: str | None = None


@dataclasses.dataclass(frozen=True)
class FeatureTableConfig(TableSpec):
    """A side's feature table: one row per key."""

    key: str = "id"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data comes from.

    Attributes:
        source: ``files`` (the tables below), ``synthetic`` (the built-in generator),
            a MovieLens or Amazon adapter reading the folder ``path``, or ``sequences``:
            the sequence file ``path`` (``twotower.data.sequences``).
        path: the dataset folder, for adapters; the file, for ``sequences``.
        interactions: the interactions file (``files``); with ``split.method: given``
            it holds the training interactions.
        valid: the user's own validation interactions (same columns).
        test: the user's own test interactions (same columns).
        queries: the query-side feature table.
        items: the item-side feature table (the retrieval corpus).
        min_weight: keep only interactions whose weight is at least this (e.g. rating >= 4).
        on_missing_rows: an id with no feature row: ``error``, ``impute`` or ``drop``.
        synthetic: the generator's settings, for ``source: synthetic``.
        sample_queries: keep the interactions of only this many queries (users), drawn
            at random among those with interactions; for quick experiments.
        sample_seed: the seed of that draw.
        stream: for ``source: stream``, Parquet streamed in bounded memory (training
            on data larger than memory; ``twotower.data.stream``).
    """

    source: Literal[
        "files",
        "synthetic",
        "movielens-100k",
        "movielens-1m",
        "movielens-latest-small",
        "movielens-latest-small-search",
        "amazon-toys",
        "amazon-sports",
        "sequences",
        "stream",
    ] = "synthetic"
    path: Path | None = None
    interactions: InteractionsConfig | None = None
    valid: TableSpec | None = None
    test: TableSpec | None = None
    queries: FeatureTableConfig | None = None
    items: FeatureTableConfig | None = None
    min_weight: float | None = None
    on_missing_rows: MissingRows = "error"
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    sample_queries: int | None = None
    sample_seed: int = 0
    stream: StreamConfig | None = None

    def __post_init__(self) -> None:
        if self.streamed != (self.stream is not None):
            raise ValueError("data.source 'stream' goes with a data.stream section, and only it")
        if self.sample_queries is not None and self.sample_queries < 1:
            raise ValueError(f"sample_queries must be >= 1, got {self.sample_queries}")

    @property
    def streamed(self) -> bool:
        """Whether the data is read from Parquet in bounded memory, never whole
        (``source: stream``); ``twotower.sources.open_source`` then reads it as a stream
        or a data build, and nothing else asks."""
        return self.source == "stream"


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """How interactions are split (see ``twotower.data.splits`` for each method).

    Attributes:
        method: ``leave_last_out``, ``random``, ``time`` or ``given``.
        ratios: train, validation and test shares (``random``; ``time`` without
            cut-offs).
        valid_from: ``time``: validation starts at this timestamp.
        test_from: ``time``: test starts at this timestamp.
        seed: the seed of ``random``'s shuffle and of the new items' draw.
        train_from: the new period of an incremental run: only the training
            interactions at or after this timestamp are training examples (and what
            the features are fitted on); the earlier ones still count as known, in
            histories and seen items. None: every training interaction is an example.
            Needs timestamps and the data in memory.
        new_items: the share of items held out of training entirely (new items): drawn
            with ``seed`` among the items with at least ``new_items_min_count``
            interactions, every interaction of theirs goes to test; the method splits
            the rest. 0: none. Needs the data in memory.
        new_items_min_count: the fewest interactions an item needs to be drawn as new
            (so the test has that many of its pairs to find).
        new_items_valid: another share of items held out of training, drawn after
            ``new_items`` among the same items, every interaction of theirs in
            validation: new items to choose settings on, never test's. 0: none.
    """

    method: Literal["leave_last_out", "random", "time", "given"] = "leave_last_out"
    ratios: list[float] = dataclasses.field(default_factory=lambda: [0.8, 0.1, 0.1])
    valid_from: float | None = None
    test_from: float | None = None
    seed: int = 0
    train_from: float | None = None
    new_items: float = 0.0
    new_items_min_count: int = 1
    new_items_valid: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.new_items < 1 or not 0 <= self.new_items_valid < 1:
            raise ValueError(
                "new_items and new_items_valid must be shares in [0, 1), got "
                f"{self.new_items} and {self.new_items_valid}"
            )
        if self.new_items + self.new_items_valid >= 1:
            raise ValueError(
                f"new_items ({self.new_items}) and new_items_valid ({self.new_items_valid}) "
                "must leave some items to train on: their sum must be below 1"
            )
        if self.new_items_min_count < 1:
            raise ValueError(f"new_items_min_count must be >= 1, got {self.new_items_min_count}")
        if len(self.ratios) != 3 or min(self.ratios) < 0 or abs(sum(self.ratios) - 1) > 1e-6:
            raise ValueError(
                f"ratios must be three non-negative numbers summing to 1: {self.ratios}"
            )
        start, end = self.train_from, self.valid_from
        if self.method == "time" and start is not None and end is not None and start >= end:
            raise ValueError(
                f"train_from ({start}) must come before valid_from ({end}): the training "
                "examples lie between them"
            )

    @property
    def holds_new_items(self) -> bool:
        """Whether some items are held out of training (``new_items``, ``new_items_valid``)."""
        return self.new_items > 0 or self.new_items_valid > 0
