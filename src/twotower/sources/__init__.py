"""Where a run's data comes from: one interface over data in memory and a data build.

Training, evaluation, the baselines and export read a run's data through a
``DataSource`` (``sources/base.py``) and never ask which kind they were given;
``open_source`` is the one place that looks at ``data.source`` and chooses:

- ``MemorySource`` (``sources/memory.py``): the dataset read into memory and split.
- ``BuiltSource`` (``sources/stream.py``): a data build (``twotower data build``), read
  a row group at a time, in memory bounded by the corpus and a chunk of queries.
- ``StreamSource`` (``sources/stream.py``): a Parquet stream without a build; it
  trains, and everything that needs each query's state as of a part (evaluation,
  baselines, export) refuses it with ``NEEDS_BUILD``.

Every source answers a part's queries as ``QueryChunk``s (their raw rows and the
transforms that read them as of the part, the items they knew before it, the part's
own items), so one function ranks a model and one fits and ranks a baseline, whichever
source it is.
"""

from __future__ import annotations

from twotower.config import Config
from twotower.data.dataset import Dataset
from twotower.data.splits import Split
from twotower.errors import ConfigError
from twotower.sources.base import (
    AS_OF,
    NEEDS_BUILD,
    NO_WARM_START,
    PARTS,
    DataSource,
    ExampleBuilder,
    FittedFeatures,
    KnownQueries,
    QueryChunk,
    check_as_of,
)
from twotower.sources.memory import MemorySource, read_dataset
from twotower.sources.stream import BuiltSource, StreamSource

__all__ = [
    "AS_OF",
    "NEEDS_BUILD",
    "NO_WARM_START",
    "PARTS",
    "BuiltSource",
    "DataSource",
    "ExampleBuilder",
    "FittedFeatures",
    "KnownQueries",
    "MemorySource",
    "QueryChunk",
    "StreamSource",
    "check_as_of",
    "load_data",
    "open_source",
    "read_dataset",
]


def open_source(config: Config) -> DataSource:
    """The source the config names: the one place that chooses by ``data.source``.

    Raises:
        DataError: a table or build file is missing, malformed or inconsistent (named).
    """
    if not config.data.streamed:
        return MemorySource.read(config)
    if config.data.stream.built is None:
        return StreamSource(config)
    return BuiltSource(config)


def load_data(config: Config) -> tuple[Dataset, Split]:
    """The dataset the config names, read into memory, and its train / valid / test split.

    Raises:
        ConfigError: the source is a stream (read by ``open_source`` in bounded memory).
        DataError: a table is missing, malformed or inconsistent (named).
    """
    if config.data.streamed:
        raise ConfigError(
            "data.source 'stream' is read by training only, in bounded memory; this command "
            "needs the data in memory (a 'files' source over the same Parquet files)"
        )
    source = MemorySource.read(config)
    return source.dataset, source.split
