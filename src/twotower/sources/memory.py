"""The dataset in memory, split: every interaction at hand, every query ranked at once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from twotower.config import Config
from twotower.data.dataset import ITEM_IDX, QUERY_IDX, TIMESTAMP, Dataset
from twotower.data.load import load_dataset
from twotower.data.matrix import interaction_matrix, known_before
from twotower.data.splits import Split, split_interactions
from twotower.errors import ConfigError
from twotower.features.history import RecentLists
from twotower.features.pipeline import FeaturePipeline
from twotower.sources.base import (
    ExampleBuilder,
    FittedFeatures,
    KnownQueries,
    QueryChunk,
    check_as_of,
)


def read_dataset(config: Config) -> Dataset:
    """The dataset a config names, read with the columns its features need (unsplit).

    Raises:
        DataError: a table is missing, malformed or inconsistent (named).
    """
    return load_dataset(
        config.data,
        config.features.required_columns("query"),
        config.features.required_columns("item"),
    )


class MemorySource:
    """A dataset and its split, held in memory (``data.source: files`` and the others).

    Args:
        dataset: the tables, with dense query and item indices.
        split: its train / valid / test interactions.
    """

    def __init__(self, dataset: Dataset, split: Split) -> None:
        self.dataset, self.split = dataset, split
        self.query_key, self.item_key = dataset.query_key, dataset.item_key

    @classmethod
    def read(cls, config: Config) -> MemorySource:
        """The dataset the config names, read with the columns its features need, split.

        Raises:
            DataError: a table is missing, malformed or inconsistent (named).
        """
        dataset = read_dataset(config)
        return cls(dataset, split_interactions(dataset, config.split))

    def items(self) -> pa.Table:
        return self.dataset.items

    def num_items(self) -> int:
        return self.dataset.num_items

    def fit_features(self, config: Config, init: FeaturePipeline | None = None) -> FittedFeatures:
        """The config's features fitted on the training examples, or ``init`` grown with
        them (``FeaturePipeline.extend``); histories from every training interaction
        (deterministic: every rank of a distributed run fits the same state)."""
        dataset, split = self.dataset, self.split
        examples = split.training_examples
        if init is not None:
            pipeline = init.extend(config.features, dataset, examples, known=split.train)
        else:
            pipeline = FeaturePipeline.fit(config.features, dataset, examples)
            if split.examples is not None:  # histories also hold the earlier interactions
                pipeline = pipeline.with_histories(dataset, split.train)
        return FittedFeatures(pipeline)

    def examples(
        self, builder: ExampleBuilder, config: Config, features: FittedFeatures, device: Any
    ) -> Any:
        return builder.from_split(config, self.dataset, self.split, features.pipeline, device)

    def held_out(
        self,
        part: str,
        pipeline: FeaturePipeline | None = None,
        sample: int | None = None,
        seed: int = 0,
    ) -> Iterator[QueryChunk]:
        """Every query at once: one chunk. Histories as of the part are the training
        interactions for ``valid`` (the pipeline as fitted), training and validation ones
        for ``test``.

        Raises:
            ConfigError: a ``sample`` (for a data build; in memory every query is ranked).
        """
        if sample is not None:
            raise ConfigError("a sample of queries is for a data build; in memory all are ranked")
        dataset = self.dataset
        seen = known_before(self.split, part, dataset.num_queries, dataset.num_items)
        targets = interaction_matrix(self.split.part(part), dataset.num_queries, dataset.num_items)
        if pipeline is None:
            yield QueryChunk(seen, targets)
            return
        if part == "test":
            known = pa.concat_tables(
                [self.split.train, self.split.valid], promote_options="default"
            )
            pipeline = pipeline.with_histories(dataset, known)
        yield QueryChunk(seen, targets, dataset.queries, pipeline)

    def num_queries(self, part: str) -> int:
        return self.dataset.num_queries

    def popularity(self, part: str) -> np.ndarray:
        dataset = self.dataset
        seen = known_before(self.split, part, dataset.num_queries, dataset.num_items)
        return np.asarray(seen.sum(axis=0), dtype=np.float32).ravel()

    def new_items(self, part: str) -> np.ndarray | None:
        return self.split.new_items_in(part)

    def known_queries(self, as_of: str, pipeline: FeaturePipeline) -> KnownQueries:
        """Every query with its histories and seen items as of the end of validation
        (``valid``), of test (``test``) or of every logged interaction (``all``)."""
        check_as_of(as_of)
        dataset, split = self.dataset, self.split
        if as_of == "all":
            known = dataset.interactions
        else:
            parts = [split.train, split.valid] + ([split.test] if as_of == "test" else [])
            known = pa.concat_tables(parts)
        return KnownQueries(
            queries=dataset.queries,
            pipeline=pipeline.with_histories(dataset, known),
            seen=interaction_matrix(known, dataset.num_queries, dataset.num_items),
            heldout=interaction_matrix(split.test, dataset.num_queries, dataset.num_items),
            recent=RecentLists.from_log(
                known.column(QUERY_IDX).to_numpy(),
                known.column(ITEM_IDX).to_numpy(),
                known.column(TIMESTAMP).to_numpy() if TIMESTAMP in known.column_names else None,
                dataset.num_queries,
                pipeline.recent_length,
            ),
        )

    def refit(self) -> MemorySource:
        """Training and validation interactions as training; no validation; the same test."""
        return MemorySource(self.dataset, self.split.with_valid_in_train())
