"""The data-source interface and what its methods answer (see ``twotower.sources``).

One ``DataSource`` over data in memory and a data build: what a run's data answers,
whichever kind it is. ``twotower.sources.open_source`` chooses the kind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from twotower.config import Config
from twotower.data.config import StreamConfig
from twotower.data.dataset import Dataset
from twotower.data.splits import HELD_OUT, Split
from twotower.errors import ConfigError
from twotower.features.history import RecentLists
from twotower.features.pipeline import FeaturePipeline
from twotower.features.streaming import FIT_FILE, load_fitted, save_fitted

PARTS = HELD_OUT  # the parts a source holds queries of
AS_OF = ("valid", "test", "all")  # whose interactions an artifact's users know

# The one error for a streamed config with no data build where a command needs one.
NEEDS_BUILD = (
    "{what} reads each query's rows as of each part from a data build: build the data "
    "(twotower data build) and name it in data.stream.built"
)


@dataclasses.dataclass(frozen=True)
class QueryChunk:
    """Some of a part's queries, as a model and a baseline read them.

    Attributes:
        seen: (rows, N) binary CSR: the items each query knew before the part.
        targets: (rows, N) binary CSR: the part's own items of each query.
        queries: the queries' raw rows (their features, and their histories where the
            source holds them as rows), or None where the caller asked for no rows.
        pipeline: the fitted transforms that read ``queries`` as of the part (histories
            as of its start), or None with ``queries``.
    """

    seen: sp.csr_matrix
    targets: sp.csr_matrix
    queries: pa.Table | None = None
    pipeline: FeaturePipeline | None = None


@dataclasses.dataclass(frozen=True)
class KnownQueries:
    """The known queries an artifact serves, in the state of ``as_of``.

    Attributes:
        queries: one raw row per query (features; histories where held as rows).
        pipeline: the transforms that read them, histories as of ``as_of``.
        seen: (Q, N) binary CSR: each query's items as of ``as_of``.
        heldout: (Q, N) binary CSR: each query's test items.
        recent: each query's latest items as of ``as_of``, as many as the longest
            history feature reads: the state a served user starts from.
    """

    queries: pa.Table
    pipeline: FeaturePipeline
    seen: sp.csr_matrix
    heldout: sp.csr_matrix
    recent: RecentLists


@dataclasses.dataclass(frozen=True)
class FittedFeatures:
    """A run's fitted features: the transforms, and for a stream the (N,) training count
    of each item and whether each query feature's fit is exact."""

    pipeline: FeaturePipeline
    counts: np.ndarray | None = None
    exact: dict[str, bool] | None = None

    def save(self, folder: Path) -> None:
        """Writes the state into ``folder`` (JSON + numpy, checksummed)."""
        if self.counts is None:
            self.pipeline.save(folder)
        else:
            save_fitted(folder, self.pipeline, self.counts, self.exact or {})

    @classmethod
    def load(cls, folder: Path) -> FittedFeatures:
        """The state ``save`` wrote into ``folder``."""
        if (Path(folder) / FIT_FILE).is_file():
            return cls(*load_fitted(folder))
        return cls(FeaturePipeline.load(folder))


class ExampleBuilder(Protocol):
    """Makes a kind of training examples (``training.examples``) from either source; the
    source calls the constructor that fits it."""

    def from_split(
        self, config: Config, dataset: Dataset, split: Split, pipeline: FeaturePipeline, device: Any
    ) -> Any: ...

    def from_stream(
        self,
        config: Config,
        stream: StreamConfig,
        pipeline: FeaturePipeline,
        items: pa.Table,
        counts: np.ndarray,
        device: Any,
    ) -> Any: ...


class DataSource(Protocol):
    """A run's data, wherever it lives (see the module doc)."""

    query_key: str
    item_key: str

    def items(self) -> pa.Table:
        """The corpus: one row per item, with the columns the item features read."""
        ...

    def num_items(self) -> int:
        """N, the size of the corpus."""
        ...

    def fit_features(self, config: Config, init: FeaturePipeline | None = None) -> FittedFeatures:
        """The config's features fitted on the training examples; with ``init``, an
        earlier run's features grown with them instead (``FeaturePipeline.extend``).

        Raises:
            ConfigError: ``init`` where the source cannot grow features (a stream).
        """
        ...

    def examples(
        self, builder: ExampleBuilder, config: Config, features: FittedFeatures, device: Any
    ) -> Any:
        """The training examples ``builder`` makes of this source."""
        ...

    def held_out(
        self,
        part: str,
        pipeline: FeaturePipeline | None = None,
        sample: int | None = None,
        seed: int = 0,
    ) -> Iterator[QueryChunk]:
        """The queries with items in ``part``, a chunk at a time; with ``pipeline``, their
        raw rows and the transforms as of the part too. ``sample``: about this many
        queries, a seeded choice (a data build only)."""
        ...

    def num_queries(self, part: str) -> int:
        """How many queries ``held_out(part)`` yields in all (before a sample)."""
        ...

    def popularity(self, part: str) -> np.ndarray:
        """(N,) how many queries knew each item before ``part``."""
        ...

    def new_items(self, part: str) -> np.ndarray | None:
        """(M,) the items held out of training whose pairs ``part`` holds
        (``split.new_items``: test's), or None."""
        ...

    def known_queries(self, as_of: str, pipeline: FeaturePipeline) -> KnownQueries:
        """Every known query in the state of ``as_of`` (``AS_OF``), for an artifact."""
        ...

    def refit(self) -> DataSource:
        """This source with the validation interactions moved into training
        (``training.refit``)."""
        ...


# The one error of a source that cannot start from an earlier run's features.
NO_WARM_START = (
    "training from an earlier run (--init-from) grows its features with the new "
    "training examples, which needs the data in memory; {what} is not"
)


def check_as_of(as_of: str) -> None:
    """Refuses an ``as_of`` that is not one of ``AS_OF``."""
    if as_of not in AS_OF:
        raise ConfigError(f"unknown as-of {as_of!r}; choose one of {', '.join(AS_OF)}")
