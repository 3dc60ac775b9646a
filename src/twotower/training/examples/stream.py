"""``training.examples: interactions`` streamed from Parquet (``data.source: stream``),
in bounded memory.

What is held in memory: the item corpus and its model inputs, the per-item training
counts (for logQ and popularity sampling), one shuffle buffer per reading process,
and the held-out interactions of at most ``eval_queries`` queries with those queries'
training items (to exclude them when ranking); the held-out files are read a row group
at a time, keeping those queries' rows. The training interactions themselves
are read row group by row group, every epoch; the query features are transformed
batch by batch with the fitted state, inside DataLoader workers.

Two passes over the training files come before the first epoch: one fits the
features and counts items (``twotower.features.streaming.fit_stream_pipeline``), one
collects the evaluation queries' training items.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from twotower.data.config import StreamConfig
from twotower.data.dataset import ITEM_IDX, QUERY_IDX
from twotower.data.splits import Split
from twotower.data.stream import ParquetStream, Piece
from twotower.errors import ConfigError, DataError
from twotower.features.pipeline import FeaturePipeline
from twotower.features.streaming import ItemKeys, stream_query_columns
from twotower.towers.model import TwoTower
from twotower.training.config import WeightRule
from twotower.training.distributed import Collective
from twotower.training.examples.base import Batch, interaction_weights, row_loss, to_device

log = logging.getLogger(__name__)


class StreamingTrainingData:
    """``TrainingExamples`` over a stream: batches, item inputs, evaluation.

    Args:
        config: the stream's files and settings.
        pipeline: the fitted features (``fit_stream_pipeline``).
        item_counts: (N,) training interactions per item (``fit_stream_pipeline``).
        device: where batches and inputs go.
        seed: the evaluation sample's seed.
        weights, weight_cap: how the rows' ``config.weight`` column weighs each
            example (``TrainingConfig.weights``).

    Raises:
        ConfigError: ``weights`` without a weight column named in the stream config.
    """

    popularity: Literal["known"] | None = None  # would need every query's history

    def __init__(
        self,
        config: StreamConfig,
        pipeline: FeaturePipeline,
        items: pa.Table,
        item_counts: np.ndarray,
        device: torch.device | str = "cpu",
        seed: int = 0,
        weights: WeightRule = "none",
        weight_cap: float = 5.0,
    ) -> None:
        if weights != "none" and config.weight is None:
            raise ConfigError(
                f"training.weights={weights!r} weighs each example by its interaction's "
                "weight: name the rows' weight column in data.stream.weight"
            )
        self.config, self.pipeline = config, pipeline
        self.weights, self.weight_cap = weights, weight_cap
        self.device = torch.device(device)
        self.item_keys = ItemKeys(items.column(config.item_id).combine_chunks(), str(config.items))
        self.items = to_device(pipeline.transform("item", items), self.device)
        self.num_items = items.num_rows
        self._counts = item_counts
        self.query_columns = sorted(set(stream_query_columns(pipeline.config)) | {config.query_id})
        weight = [config.weight] if weights != "none" else []
        self.stream = ParquetStream(config.train, [*self.query_columns, config.item_id, *weight])
        self.split, rows = self._held_out(seed)
        self.num_queries = rows["valid"].num_rows
        self.queries = to_device(pipeline.transform("query", rows["valid"]), self.device)
        self.test_queries = to_device(pipeline.transform("query", rows["test"]), self.device)

    def __len__(self) -> int:
        return self.stream.num_rows

    def steps(self, batch_size: int, world: int) -> int:
        """About the optimizer steps of one epoch (every reading process ends short)."""
        return -(-len(self) // (batch_size * world))

    def item_counts(self) -> np.ndarray:
        return self._counts

    def training_pairs(self) -> None:
        """None: a stream's interactions are never all in memory at once."""
        return None

    def item_inputs(self, items: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: values[items] for name, values in self.items.items()}

    def query_inputs(self, queries: torch.Tensor, part: str = "train") -> dict[str, torch.Tensor]:
        """The evaluation queries' inputs as of ``part``: each query's features from its
        rows of that part (its history as of then, where the rows carry one), else from
        its rows of the other held-out part."""
        inputs = self.test_queries if part == "test" else self.queries
        return {name: values[queries] for name, values in inputs.items()}

    def batches(
        self, batch_size: int, generator: torch.Generator, collective: Collective | None = None
    ) -> Iterator[Batch]:
        """One epoch: every training row once, across ranks and workers.

        A rank whose share runs out before another's yields empty batches, so that
        every rank takes the same number of steps.
        """
        collective = collective or Collective()
        seed = int(torch.randint(2**62, (1,), generator=generator))
        workers = self.config.workers
        examples = _StreamExamples(self, batch_size, seed, collective)
        loader = torch.utils.data.DataLoader(
            examples, batch_size=None, num_workers=workers, persistent_workers=False
        )
        # every rank's step count: each reading process's share ends in a short batch
        readers = max(workers, 1)
        shares = np.array(self.stream.share_rows(collective.world_size * readers))
        per_rank = (-(-shares // batch_size)).reshape(collective.world_size, readers).sum(1)
        steps, empty = 0, None
        weighted = self.weights != "none"
        for query, positives, weights in loader:
            steps += 1
            empty = empty or ({k: v[:0] for k, v in query.items()}, positives[:0])
            yield Batch(
                to_device(query, self.device),
                positives.to(self.device),
                weights=weights.to(self.device) if weighted else None,
            )
        if empty is None:
            empty = self._empty()
        for _ in range(int(per_rank.max()) - steps):
            nothing = torch.zeros(0, device=self.device) if weighted else None
            yield Batch(to_device(empty[0], self.device), empty[1].to(self.device), weights=nothing)

    def loss(
        self, model: TwoTower, objective: torch.nn.Module, batch: Batch, generator: torch.Generator
    ) -> torch.Tensor:
        """The loss of a batch of interactions: each row's query against its positive."""
        return row_loss(self, model, objective, batch, generator)

    def _empty(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        table = next(self.stream.read(self.stream.share(None, 0, 1)[:1])).slice(0, 0)
        return self.pipeline.transform("query", table), torch.zeros(0, dtype=torch.int64)

    def with_item_index(self, table: pa.Table, piece: Piece) -> pa.Table:
        """Adds ``item_idx`` to rows read from ``piece``; unknown items error or drop."""
        found = self.item_keys.find(table.column(self.config.item_id))
        unknown = found < 0
        if unknown.any():
            first = table.column(self.config.item_id)[int(np.argmax(unknown))].as_py()
            where = f"{piece.group.path}, row group {piece.group.index}"
            if self.config.unknown_items == "error":
                raise DataError(
                    f"{where}: {int(unknown.sum())} interaction(s) name items not in "
                    f"{self.config.items} (first: {first!r}); set data.stream.unknown_items: "
                    "drop to skip them"
                )
            log.warning("%s: dropped %d interaction(s) with unknown items", where, unknown.sum())
            table, found = table.filter(pa.array(~unknown)), found[~unknown]
        return table.append_column(ITEM_IDX, pa.array(found))

    def _held_out(self, seed: int) -> tuple[Split, dict[str, pa.Table]]:
        """The evaluation queries' valid / test / train interactions, and each query's
        feature row as of validation and as of test."""
        config = self.config
        ids = [_read_rows(path, [config.query_id]) for path in (config.valid, config.test)]
        keys = pc.unique(pa.concat_tables(ids).column(config.query_id))
        if len(keys) > config.eval_queries:
            chosen = np.random.default_rng(seed).choice(len(keys), config.eval_queries, False)
            keys = keys.take(pa.array(np.sort(chosen)))
        # only the chosen queries' rows are kept: memory follows eval_queries, not the
        # held-out parts' size
        columns = [*self.query_columns, config.item_id]
        parts = {
            name: _read_rows(getattr(config, name), columns, (config.query_id, keys))
            for name in ("valid", "test")
        }
        # each query's features as of a part: its last row of that part, else of the
        # other (rows later in the table overwrite earlier ones)
        rows = {}
        for part, other in (("valid", "test"), ("test", "valid")):
            table = pa.concat_tables([parts[other], parts[part]])
            position = pc.index_in(table.column(config.query_id), value_set=keys)
            index = pc.fill_null(position, -1).to_numpy().astype(np.int64)
            last = np.zeros(len(keys), np.int64)
            last[index[index >= 0]] = np.flatnonzero(index >= 0)
            rows[part] = table.take(pa.array(last))
        split = {
            name: self._indexed(table, keys, f"{getattr(config, name)}")
            for name, table in parts.items()
        }
        train = []
        columns = [config.query_id, config.item_id]
        pass_stream = ParquetStream(config.train, columns)
        pieces = pass_stream.share(None, 0, 1)
        for piece, table in zip(pieces, pass_stream.read(pieces), strict=True):
            wanted = pc.is_in(table.column(config.query_id), value_set=keys)
            train.append(self._indexed(table.filter(wanted), keys, str(piece.group.path)))
        split["train"] = pa.concat_tables(train) if train else split["valid"].slice(0, 0)
        return Split(**split), rows

    def _indexed(self, table: pa.Table, keys: pa.Array, where: str) -> pa.Table:
        """``query_idx`` / ``item_idx`` of the rows whose query is among ``keys``."""
        query = pc.index_in(table.column(self.config.query_id), value_set=keys)
        table = table.filter(pc.is_valid(query))
        query = query.filter(pc.is_valid(query))
        item = self.item_keys.find(table.column(self.config.item_id))
        known = item >= 0
        if not known.all():
            log.warning("%s: %d held-out row(s) name unknown items; skipped", where, (~known).sum())
        return pa.table(
            {
                QUERY_IDX: pc.cast(query, pa.int64()).to_numpy()[known],
                ITEM_IDX: item[known],
            }
        )


class _StreamExamples(torch.utils.data.IterableDataset):
    """One epoch of one rank's batches; each DataLoader worker reads its own share."""

    def __init__(
        self, data: StreamingTrainingData, batch_size: int, seed: int, collective: Collective
    ) -> None:
        super().__init__()
        self.data, self.batch_size, self.seed, self.collective = data, batch_size, seed, collective

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]:
        """(query inputs, positive item indices, loss weights: empty when unweighted)."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        data, collective = self.data, self.collective
        part = collective.rank * workers + worker
        pieces = data.stream.share(self.seed, part, collective.world_size * workers)
        rng = np.random.default_rng([self.seed, part])
        tables = data.stream.batches(
            pieces, self.batch_size, data.config.buffer_rows, rng, prepare=data.with_item_index
        )
        for table in tables:
            query = data.pipeline.transform("query", table)
            positives = torch.from_numpy(table.column(ITEM_IDX).to_numpy().copy())
            weights = torch.zeros(0)
            if data.weights != "none":
                where = f"streamed interaction ({data.config.train})"
                column = table.column(data.config.weight)
                weights = torch.from_numpy(
                    interaction_weights(column, data.weights, data.weight_cap, where)
                )
            yield query, positives, weights


def _read_rows(path, columns: list[str], keep: tuple[str, pa.Array] | None = None) -> pa.Table:
    """A held-out part's ``columns``, a row group at a time; with ``keep = (column,
    values)``, only the rows whose column is among the values."""
    stream = ParquetStream(path, columns)
    tables = []
    for table in stream.read(stream.share(None, 0, 1)):
        if keep is not None:
            table = table.filter(pc.is_in(table.column(keep[0]), value_set=keep[1]))
        tables.append(table)
    if not tables:
        raise DataError(f"{path}: no held-out interactions")
    return pa.concat_tables(tables)
