"""Baselines behind the same evaluator as the model: fit, rank the full corpus, report.

Each step sees the interactions known before it: a baseline ranking the validation
split is fitted on train; the one ranking the test split on train + validation,
exactly as the model's histories are at that step.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import scipy.sparse as sp

from twotower.baselines.config import BaselinesConfig
from twotower.baselines.ease import EASE
from twotower.baselines.itemknn import ItemKNN
from twotower.baselines.popularity import Popularity
from twotower.data.build.format import SEEN, TARGETS, built_stream
from twotower.data.config import StreamConfig
from twotower.data.dataset import Dataset
from twotower.data.matrix import known_before
from twotower.data.splits import Split
from twotower.data.stream import ParquetStream
from twotower.errors import DataError
from twotower.evaluation.ranking import HeldOut, evaluate, evaluate_chunks
from twotower.features.streaming import ItemKeys, item_matrix
from twotower.storage import atomic_write

log = logging.getLogger(__name__)

PARTS = ("valid", "test")

BASELINES: dict[str, type[Popularity | ItemKNN | EASE]] = {
    "pop": Popularity,
    "itemknn": ItemKNN,
    "ease": EASE,
}


def build_baseline(name: str, config: BaselinesConfig) -> Popularity | ItemKNN | EASE:
    """The baseline called ``name`` (``pop``, ``itemknn``, ``ease``) with its settings."""
    if name == "pop":
        return Popularity()
    if name == "itemknn":
        return ItemKNN(neighbors=config.itemknn_neighbors, shrink=config.itemknn_shrink)
    if name == "ease":
        return EASE(l2=config.ease_l2)
    raise ValueError(f"unknown baseline {name!r}; choose pop, itemknn or ease")


def evaluate_baseline(
    name: str,
    dataset: Dataset,
    split: Split,
    ks: tuple[int, ...] | list[int],
    config: BaselinesConfig | None = None,
    exclude_seen: bool = True,
    parts: tuple[str, ...] = PARTS,
) -> dict[str, float]:
    """Flat ``valid/...`` and ``test/...`` metrics of one baseline (see module doc)."""
    config = config or BaselinesConfig()
    results: dict[str, float] = {}
    for part in parts:
        known = known_before(split, part, dataset.num_queries, dataset.num_items)
        model = build_baseline(name, config).fit(known)
        results.update(
            evaluate(
                model.score,
                split,
                part,
                dataset.num_queries,
                dataset.num_items,
                ks=ks,
                exclude_seen=exclude_seen,
                item_popularity="known",
            )
        )
    return results


def evaluate_baseline_built(
    name: str,
    folder: Path,
    ks: tuple[int, ...] | list[int],
    config: BaselinesConfig | None = None,
    exclude_seen: bool = True,
    parts: tuple[str, ...] = PARTS,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """``evaluate_baseline`` on a data build: fitted, for each part, on every query's
    items known before it (the build's ``queries_{part}.parquet``, read a row group at
    a time and summed into item x item co-occurrence counts), then ranking each query.

    What is in memory is the baseline itself (N counts; item-KNN's and EASE's item x
    item matrices) and a row group of queries, never the interactions.

    Raises:
        DataError: the baseline would need more than half of this machine's memory
            (the size is named).
    """
    config = config or BaselinesConfig()
    stream = built_stream(StreamConfig(built=Path(folder)))
    keys_column = pq.read_table(stream.items, columns=[stream.item_id]).column(stream.item_id)
    keys = ItemKeys(keys_column.combine_chunks(), str(stream.items))
    num_items = len(keys_column)
    results: dict[str, float] = {}
    for part in parts:
        path = Path(folder) / f"queries_{part}.parquet"
        model, counts = _fit_built(name, config, path, keys, num_items)
        chunks = (
            HeldOut(lambda r, seen=seen, model=model: model.score_rows(seen[r]), targets, seen)
            for seen, targets in _query_rows(path, keys, num_items)
        )
        total = pq.ParquetFile(path).metadata.num_rows
        results.update(
            evaluate_chunks(chunks, part, num_items, ks, exclude_seen, chunk_size, counts, total)
        )
    return results


def _fit_built(
    name: str, config: BaselinesConfig, path: Path, keys: ItemKeys, num_items: int
) -> tuple[Popularity | ItemKNN | EASE, np.ndarray]:
    """A baseline fitted on a build's query file, and the (N,) number of queries that
    know each item. EASE reads the file once (its memory depends on N alone, and the
    counts are its Gram matrix's diagonal); item-KNN twice (the co-occurrences it will
    hold are counted before they are built); popularity once."""
    model = build_baseline(name, config)
    if name == "ease":
        _check_memory(name, num_items, 0)
        gram = _gram(path, keys, num_items)
        model.fit_gram(gram)
        return model, gram.diagonal()
    counts, pairs = np.zeros(num_items), 0
    for seen, _ in _query_rows(path, keys, num_items):
        counts += seen.sum(axis=0).A1
        pairs += int((np.diff(seen.indptr) ** 2).sum())
    if name == "pop":
        model.fit_gram(sp.diags(counts, format="csr"))
    else:
        _check_memory(name, num_items, pairs)
        model.fit_gram(_gram(path, keys, num_items))
    return model, counts


def _gram(path: Path, keys: ItemKeys, num_items: int) -> sp.csr_matrix:
    """(N, N) co-occurrence counts X^T X of a build's query file, a row group at a time."""
    gram = sp.csr_matrix((num_items, num_items))
    for seen, _ in _query_rows(path, keys, num_items):
        gram = gram + seen.T @ seen
    return gram


def _query_rows(
    path: Path, keys: ItemKeys, num_items: int
) -> Iterator[tuple[sp.csr_matrix, sp.csr_matrix]]:
    """A build's query rows, a row group at a time: (seen, targets) as (rows, N) CSR."""
    queries = ParquetStream(path, [SEEN, TARGETS])
    for table in queries.read(queries.share(None, 0, 1)):
        yield tuple(item_matrix(table.column(c), keys, num_items, path) for c in (SEEN, TARGETS))


def _check_memory(name: str, num_items: int, pairs: int) -> None:
    """Refuses a baseline that would need more than half of this machine's memory."""
    if name == "ease":  # X^T X, its inverse (float64) and B (float32), each N x N
        needed, what = 20 * num_items**2, f"three dense {num_items:,} x {num_items:,} matrices"
    else:  # the co-occurrence counts (at most ``pairs`` entries) and a block of rows
        block = min(ItemKNN().block_size, num_items)
        needed = 12 * pairs + 24 * block * num_items
        what = f"up to {pairs:,} co-occurrences and {block:,} x {num_items:,} dense rows"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > memory / 2:
        raise DataError(
            f"{name} on {num_items:,} items needs about {needed / 2**30:.1f} GiB ({what}), "
            f"more than half of this machine's {memory / 2**30:.1f} GiB; use pop, or a "
            "machine with more memory"
        )


def write_metrics(metrics: dict[str, Any], path: Path) -> None:
    """``metrics.json``, written atomically."""
    text = json.dumps(metrics, indent=2, sort_keys=True).encode("utf-8")
    atomic_write(path, lambda f: f.write(text))
