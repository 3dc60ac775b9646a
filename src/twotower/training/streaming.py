"""Training examples streamed from Parquet (``data.source: stream``), in bounded memory.

What is held in memory: the item corpus and its model inputs, the per-item training
counts (for logQ and popularity sampling), one shuffle buffer per reading process,
and the held-out interactions of at most ``eval_queries`` queries with those queries'
training items (to exclude them when ranking). The training interactions themselves
are read row group by row group, every epoch; the query features are transformed
batch by batch with the fitted state, inside DataLoader workers.

Two passes over the training files come before the first epoch: one fits the
features (``twotower.features.streaming``) and counts items, one collects the
evaluation queries' training items.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from twotower.data.dataset import ITEM_IDX, QUERY_IDX
from twotower.data.splits import Split
from twotower.data.stream import ParquetStream, Piece, StreamConfig, parquet_files
from twotower.errors import DataError
from twotower.features.categorical import SortedKeys
from twotower.features.pipeline import FeaturePipeline
from twotower.features.specs import FeaturesConfig
from twotower.features.streaming import StreamingFit
from twotower.training.data import Batch
from twotower.training.distributed import Collective

log = logging.getLogger(__name__)

READ_ROWS = 65_536  # rows per table in the fitting passes


class ItemKeys:
    """The corpus's item keys, found by binary search (integer or text keys)."""

    def __init__(self, keys: pa.Array, where: str) -> None:
        if pc.count_distinct(keys).as_py() != len(keys) or keys.null_count:
            raise DataError(f"{where}: item keys must be unique and not null")
        self.integer = pa.types.is_integer(keys.type)
        self._keys = SortedKeys(self._numpy(keys))

    def _numpy(self, values: pa.Array) -> np.ndarray:
        if self.integer:
            return pc.cast(pc.fill_null(values, 0), pa.int64()).to_numpy()
        text = pc.cast(pc.fill_null(values, ""), pa.string())
        return text.to_numpy(zero_copy_only=False).astype(str)

    def find(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """(rows,) item index of each key; -1 for keys not in the corpus."""
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        if self.integer and not pa.types.is_integer(values.type):
            return np.full(len(values), -1, np.int64)
        found = self._keys.find(self._numpy(values))
        return np.where(pc.is_null(values).to_numpy(zero_copy_only=False), -1, found)


class StreamingTrainingData:
    """``TrainingData``'s interface over a stream: batches, item inputs, evaluation.

    Args:
        config: the stream's files and settings.
        pipeline: the fitted features (``fit_stream_pipeline``).
        item_counts: (N,) training interactions per item (``fit_stream_pipeline``).
        device: where batches and inputs go.
        seed: the evaluation sample's seed.
    """

    popularity = None  # popularity@k would need every query's history; not reported

    def __init__(
        self,
        config: StreamConfig,
        pipeline: FeaturePipeline,
        items: pa.Table,
        item_counts: np.ndarray,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        self.config, self.pipeline = config, pipeline
        self.device = torch.device(device)
        self.item_keys = ItemKeys(items.column(config.item_id).combine_chunks(), str(config.items))
        self.items = _to(pipeline.transform("item", items), self.device)
        self.num_items = items.num_rows
        self._counts = item_counts
        self.query_columns = sorted(
            {spec.column for spec in pipeline.config.query} | {config.query_id}
        )
        self.stream = ParquetStream(config.train, [*self.query_columns, config.item_id])
        self.split, eval_queries = self._held_out(seed)
        self.queries = _to(pipeline.transform("query", eval_queries), self.device)
        self.test_queries = self.queries

    def __len__(self) -> int:
        return self.stream.num_rows

    def item_counts(self) -> np.ndarray:
        return self._counts

    def item_inputs(self, items: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: values[items] for name, values in self.items.items()}

    def query_inputs(self, queries: torch.Tensor, part: str = "train") -> dict[str, torch.Tensor]:
        """The evaluation queries' inputs (a stream has no per-step histories)."""
        return {name: values[queries] for name, values in self.queries.items()}

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
        for query, positives in loader:
            steps += 1
            empty = empty or ({k: v[:0] for k, v in query.items()}, positives[:0])
            yield Batch(_to(query, self.device), positives.to(self.device))
        if empty is None:
            empty = self._empty()
        for _ in range(int(per_rank.max()) - steps):
            yield Batch(_to(empty[0], self.device), empty[1].to(self.device))

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

    def _held_out(self, seed: int) -> tuple[Split, pa.Table]:
        """The evaluation queries' valid / test / train interactions, and their rows."""
        config = self.config
        parts = {"valid": _read_all(config.valid, self.query_columns, config.item_id)}
        parts["test"] = _read_all(config.test, self.query_columns, config.item_id)
        everyone = pa.concat_tables([parts["valid"], parts["test"]])
        keys = pc.unique(everyone.column(config.query_id))
        if len(keys) > config.eval_queries:
            chosen = np.random.default_rng(seed).choice(len(keys), config.eval_queries, False)
            keys = keys.take(pa.array(np.sort(chosen)))
        # each query's features: its last held-out row (a later row overwrites)
        position = pc.index_in(everyone.column(config.query_id), value_set=keys)
        index = pc.fill_null(position, -1).to_numpy().astype(np.int64)
        last = np.zeros(len(keys), np.int64)
        last[index[index >= 0]] = np.flatnonzero(index >= 0)
        queries = everyone.take(pa.array(last))
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
        return Split(**split), queries

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

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
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
            yield query, torch.from_numpy(table.column(ITEM_IDX).to_numpy().copy())


def fit_stream_pipeline(
    config: StreamConfig, features: FeaturesConfig, seed: int = 0
) -> tuple[FeaturePipeline, pa.Table, np.ndarray, dict[str, bool]]:
    """Fits the features from one pass over the training stream, in bounded memory.

    Returns:
        The fitted pipeline, the item table, the (N,) training count of each item,
        and whether each query feature's fit is exact (``twotower.features.streaming``).
    """
    items = read_items(config, features)
    item_keys = ItemKeys(items.column(config.item_id).combine_chunks(), str(config.items))
    pipeline = FeaturePipeline(features)
    query_fit = StreamingFit(
        pipeline.transforms["query"], config.max_distinct, config.max_sample, seed
    )
    columns = sorted({spec.column for spec in features.query} | {config.item_id})
    stream = ParquetStream(config.train, columns)
    counts = np.zeros(items.num_rows, np.int64)
    pieces = stream.share(None, 0, 1)
    bar = tqdm(total=stream.num_rows, desc="fit features", unit="row", unit_scale=True)
    with bar:
        for table in stream.read(pieces):
            query_fit.update(table)
            found = item_keys.find(table.column(config.item_id))
            counts += np.bincount(found[found >= 0], minlength=len(counts))
            bar.update(table.num_rows)
    exact = query_fit.finish()
    pipeline.fit_side("item", items, config.item_id, counts)
    approximate = [name for name, ok in exact.items() if not ok]
    if approximate:
        log.info("fitted approximately (past max_distinct / max_sample): %s", approximate)
    return pipeline, items, counts, exact


def read_items(config: StreamConfig, features: FeaturesConfig) -> pa.Table:
    """The item table (the corpus), with the columns the item features read."""
    columns = sorted({spec.column for spec in features.item} | {config.item_id})
    parquet_files(config.items)  # a clear error if there is nothing to read
    try:
        table = pq.read_table(config.items, columns=columns)
    except (pa.ArrowInvalid, OSError, KeyError) as err:
        raise DataError(f"{config.items}: cannot read the item columns {columns} ({err})") from None
    if table.num_rows == 0:
        raise DataError(f"{config.items}: the item table has no rows")
    return table


def _read_all(path, query_columns: list[str], item_id: str) -> pa.Table:
    stream = ParquetStream(path, [*query_columns, item_id])
    tables = list(stream.read(stream.share(None, 0, 1)))
    if not tables:
        raise DataError(f"{path}: no held-out interactions")
    return pa.concat_tables(tables)


def _to(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in inputs.items()}
