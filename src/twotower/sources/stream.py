"""Data read from Parquet in bounded memory: a plain stream, and a data build.

A stream (``data.source: stream``) trains from its row groups; the features are fitted
from one pass over it. A data build (``data.stream.built``, ``twotower data build``)
also holds, for each part, one row per query: its features and histories as of the part,
the items it knew before it (``seen``) and the part's own items (``targets``), in
``queries_{part}.parquet``; evaluation, baselines and export read those a row group at
a time, so what is in memory is the corpus and one row group of queries.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from twotower.config import Config
from twotower.config_io import to_dict
from twotower.data.build.format import FEATURES_DIR, QUERY_COLUMNS, SEEN, TARGETS, built_stream
from twotower.data.config import StreamConfig
from twotower.data.splits import check_held_out
from twotower.data.stream import ParquetStream
from twotower.errors import ConfigError, DataError
from twotower.features.history import RecentLists
from twotower.features.pipeline import FeaturePipeline
from twotower.features.ragged import list_parts
from twotower.features.streaming import (
    ItemKeys,
    fit_stream_pipeline,
    item_matrix,
    load_fitted,
    read_items,
    stream_query_columns,
)
from twotower.sources.base import (
    NEEDS_BUILD,
    NO_WARM_START,
    ExampleBuilder,
    FittedFeatures,
    KnownQueries,
    QueryChunk,
    check_as_of,
)


class StreamSource:
    """A Parquet stream with no data build: it trains; what needs each query's state as
    of a part refuses it (``NEEDS_BUILD``).

    Args:
        config: the run's config, ``data.source: stream``.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stream: StreamConfig = built_stream(config.data.stream)
        self.query_key, self.item_key = self.stream.query_id, self.stream.item_id
        self._items: pa.Table | None = None
        self._keys: tuple[ItemKeys, int] | None = None

    def items(self) -> pa.Table:
        if self._items is None:
            self._items = read_items(self.stream, self.config.features)
        return self._items

    def num_items(self) -> int:
        return self._item_keys()[1]

    def fit_features(self, config: Config, init: FeaturePipeline | None = None) -> FittedFeatures:
        """The config's features fitted from one pass over the training stream.

        Raises:
            ConfigError: ``init`` (a stream does not grow an earlier run's features).
        """
        if init is not None:
            raise ConfigError(NO_WARM_START.format(what="a Parquet stream"))
        pipeline, self._items, counts, exact = fit_stream_pipeline(
            self.stream, config.features, config.seed
        )
        return FittedFeatures(pipeline, counts, exact)

    def examples(
        self, builder: ExampleBuilder, config: Config, features: FittedFeatures, device: Any
    ) -> Any:
        assert features.counts is not None  # a streamed fit counts the items
        pipeline, counts = features.pipeline, features.counts
        return builder.from_stream(config, self.stream, pipeline, self.items(), counts, device)

    def held_out(
        self,
        part: str,
        pipeline: FeaturePipeline | None = None,
        sample: int | None = None,
        seed: int = 0,
    ) -> Iterator[QueryChunk]:
        raise _needs_build("ranking a streamed run's queries")

    def num_queries(self, part: str) -> int:
        raise _needs_build("ranking a streamed run's queries")

    def popularity(self, part: str) -> np.ndarray:
        raise _needs_build("ranking a streamed run's queries")

    def new_items(self, part: str) -> None:
        return None  # a streamed config with split.new_items is refused (Config)

    def known_queries(self, as_of: str, pipeline: FeaturePipeline) -> KnownQueries:
        raise _needs_build("exporting a streamed run")

    def _item_keys(self) -> tuple[ItemKeys, int]:
        """The corpus's item ids (read alone: the baselines need no item feature) and N."""
        if self._keys is None:
            ids = pq.read_table(self.stream.items, columns=[self.item_key]).column(self.item_key)
            self._keys = (ItemKeys(ids.combine_chunks(), str(self.stream.items)), len(ids))
        return self._keys

    def refit(self) -> StreamSource:
        raise ConfigError("training.refit needs the data in memory; a stream cannot refit")


class BuiltSource(StreamSource):
    """A data build (``data.stream.built``): a stream whose features were fitted once
    by the build, with each query's rows as of each part (see the module doc).

    Args:
        config: the run's config, ``data.source: stream`` with ``data.stream.built``.
    """

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        assert config.data.stream.built is not None  # open_source chooses this source so
        self.folder = Path(config.data.stream.built)

    def fit_features(self, config: Config, init: FeaturePipeline | None = None) -> FittedFeatures:
        """The features the build fitted (``features/``), refused where the build was
        made for other features than the config's, or with ``init`` (a build's features
        are fitted when it is built)."""
        if init is not None:
            raise ConfigError(NO_WARM_START.format(what="a data build"))
        pipeline, counts, exact = load_fitted(self.folder / FEATURES_DIR)
        if to_dict(pipeline.config) != to_dict(config.features):
            raise ConfigError(
                f"{self.folder}: built for other features than this config's; build it again "
                "with this config (twotower data build)"
            )
        return FittedFeatures(pipeline, counts, exact)

    def held_out(
        self,
        part: str,
        pipeline: FeaturePipeline | None = None,
        sample: int | None = None,
        seed: int = 0,
    ) -> Iterator[QueryChunk]:
        """The part's queries a row group of ``queries_{part}.parquet`` at a time;
        ``sample``: each row kept with probability sample / rows, by a generator seeded
        with ``seed`` (the same rows every time)."""
        check_held_out(part)
        path = self._queries(part)
        columns = {SEEN, TARGETS}
        if pipeline is not None:
            columns |= {self.query_key, *stream_query_columns(pipeline.config)}
        queries = ParquetStream(path, sorted(columns))
        keep = 1.0 if sample is None else min(1.0, sample / max(queries.num_rows, 1))
        rng = np.random.default_rng(seed)
        for table in queries.read(queries.share(None, 0, 1)):
            if keep < 1.0:
                table = table.filter(rng.random(table.num_rows) < keep)
            seen, targets = (self._matrix(table.column(c), path) for c in (SEEN, TARGETS))
            rows = None if pipeline is None else table
            yield QueryChunk(seen, targets, rows, pipeline)

    def num_queries(self, part: str) -> int:
        return pq.ParquetFile(self._queries(part)).metadata.num_rows

    def popularity(self, part: str) -> np.ndarray:
        path = self._queries(part)
        counts = np.zeros(self._item_keys()[1], np.float64)
        seen_only = ParquetStream(path, [SEEN])
        for table in seen_only.read(seen_only.share(None, 0, 1)):
            counts += self._matrix(table.column(SEEN), path).sum(axis=0).A1
        return counts

    def known_queries(self, as_of: str, pipeline: FeaturePipeline) -> KnownQueries:
        """The build's rows as of ``as_of``: ``queries_test.parquet`` (the state before
        test) for ``valid``, ``queries_all.parquet`` otherwise; held-out items those of
        ``queries_test.parquet``."""
        check_as_of(as_of)
        path = self.folder / f"queries_{'test' if as_of == 'valid' else 'all'}.parquet"
        state = pq.read_table(path)
        test_path = self._queries("test")
        test = pq.read_table(test_path, columns=[self.query_key, TARGETS])
        if not test.column(self.query_key).equals(state.column(self.query_key)):
            raise DataError(f"{self.folder}: queries_test.parquet and {path.name} disagree")
        histories = [
            c for c in pipeline.input_columns("query") if c not in pipeline.state_columns("query")
        ]
        return KnownQueries(
            queries=state.drop_columns([*QUERY_COLUMNS, *histories]),
            pipeline=pipeline,
            seen=self._matrix(state.column(SEEN), path),
            heldout=self._matrix(test.column(TARGETS), test_path),
            recent=self._recent(state, histories, pipeline.recent_length),
        )

    def _recent(self, state: pa.Table, histories: list[str], width: int) -> RecentLists:
        """Each row's latest items from its longest history list column (item ids, most
        recent first; blanks left out), without timestamps: a build keeps none."""
        if not histories:
            return RecentLists.from_lists(np.zeros(0, np.int64), np.zeros(state.num_rows), 0)
        lists = state.column(histories[0]).combine_chunks()
        for name in histories[1:]:  # the longest lists: the feature that reads the most
            other = state.column(name).combine_chunks()
            if (
                pc.sum(pc.list_value_length(other)).as_py()
                > pc.sum(pc.list_value_length(lists)).as_py()
            ):
                lists = other
        flat, lengths = list_parts(lists)
        rows = self._item_keys()[0].find(flat)
        owner = np.repeat(np.arange(len(lengths)), lengths)
        known = rows >= 0
        lengths = np.bincount(owner[known], minlength=len(lengths))
        return RecentLists.from_lists(rows[known], lengths, width)

    def _queries(self, part: str) -> Path:
        return self.folder / f"queries_{part}.parquet"

    def _matrix(self, column: pa.ChunkedArray, path: Path) -> sp.csr_matrix:
        """(rows, N) binary CSR of a list column of item ids."""
        keys, num_items = self._item_keys()
        return item_matrix(column, keys, num_items, path)


def _needs_build(what: str) -> ConfigError:
    """The one refusal of a stream without a build, for ``what`` it was asked."""
    return ConfigError(NEEDS_BUILD.format(what=what))
