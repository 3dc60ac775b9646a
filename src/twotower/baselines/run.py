"""Baselines behind the same evaluator as the model: fit, rank the full corpus, report.

Each step sees the interactions known before it: a baseline ranking the validation
split is fitted on train; the one ranking the test split on train + validation,
exactly as the model's histories are at that step.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from twotower.baselines.config import BaselinesConfig
from twotower.baselines.ease import EASE
from twotower.baselines.itemknn import ItemKNN
from twotower.baselines.popularity import Popularity
from twotower.config import Config, save_config
from twotower.errors import ConfigError, DataError
from twotower.evaluation.ranking import HeldOut, evaluate_chunks
from twotower.sources import PARTS, DataSource, open_source
from twotower.storage import write_json

log = logging.getLogger(__name__)

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
    source: DataSource,
    ks: tuple[int, ...] | list[int],
    config: BaselinesConfig | None = None,
    exclude_seen: bool = True,
    parts: tuple[str, ...] = PARTS,
    groups: bool = True,
) -> dict[str, float]:
    """Flat ``valid/...`` and ``test/...`` metrics of one baseline (see module doc),
    by item popularity and query activity group too (``groups``), as the model's are.

    For each part the baseline is fitted on every query's items known before it, summed
    a chunk of queries at a time into item x item co-occurrence counts (in memory, one
    chunk; on a data build, a row group of ``queries_{part}.parquet``), then ranks each
    query from those items. What is in memory is the baseline itself (N counts; item-KNN's
    and EASE's item x item matrices) and a chunk of queries, never more interactions.
    With new items held out (``split.new_items``), test's metrics on their pairs alone too
    (``test/new_items/...``): a baseline scores an item it knows no interaction of 0.

    Raises:
        DataError: the baseline would need more than half of this machine's memory
            (the size is named).
    """
    config = config or BaselinesConfig()
    results: dict[str, float] = {}
    for part in parts:
        model, popularity = _fit(name, config, source, part)
        chunks = _scored(model, source, part)
        total, num_items = source.num_queries(part), len(popularity)
        counts = popularity if groups else None
        new_items = source.new_items(part)  # scored 0: no interaction of theirs is known
        results.update(
            evaluate_chunks(
                chunks,
                part,
                num_items,
                ks,
                exclude_seen,
                1024,
                popularity,
                total,
                counts,
                new_items=new_items,
            )
        )
    return results


def _scored(model: Popularity | ItemKNN | EASE, source: DataSource, part: str) -> Iterator[HeldOut]:
    """The part's queries, a chunk at a time, scored by ``model`` from their seen items."""
    for chunk in source.held_out(part):
        seen = chunk.seen
        yield HeldOut(lambda rows, seen=seen: model.score_rows(seen[rows]), chunk.targets, seen)


def baseline_run(
    name: str, config: Config, out: Path, parts: tuple[str, ...] = PARTS
) -> dict[str, float]:
    """``twotower baseline``: one baseline on the config's data, its metrics and resolved
    config written into the run folder ``out`` (``metrics.json``, ``config.yaml``).

    Raises:
        ConfigError: an unknown baseline name.
    """
    if name not in BASELINES:
        raise ConfigError(f"--model {name!r}: choose one of {', '.join(BASELINES)}")
    source = open_source(config)
    metrics = evaluate_baseline(name, source, config.training.ks, config.baselines, parts=parts)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    write_json(out / "metrics.json", metrics)
    return metrics


def _fit(
    name: str, config: BaselinesConfig, source: DataSource, part: str
) -> tuple[Popularity | ItemKNN | EASE, np.ndarray]:
    """A baseline fitted on the items each query knew before ``part``, and the (N,)
    number of queries that know each item. EASE reads the queries once (its memory
    depends on N alone, and the counts are its Gram matrix's diagonal); item-KNN twice
    (the co-occurrences it will hold are counted before they are built); popularity once."""
    model = build_baseline(name, config)
    if name == "pop":
        counts = source.popularity(part)
        return model.fit_gram(sp.diags(counts, format="csr")), counts
    if name == "ease":
        _check_memory(name, source.num_items(), 0)
        gram = _gram(source, part)
        return model.fit_gram(gram), np.asarray(gram.diagonal(), dtype=np.float64)
    counts, pairs = np.zeros(source.num_items()), 0
    for chunk in source.held_out(part):
        counts += chunk.seen.sum(axis=0).A1
        pairs += int((np.diff(chunk.seen.indptr) ** 2).sum())
    _check_memory(name, len(counts), pairs)
    return model.fit_gram(_gram(source, part)), counts


def _gram(source: DataSource, part: str) -> sp.csr_matrix:
    """(N, N) co-occurrence counts X^T X of the items known before ``part``, summed a
    chunk of queries at a time."""
    gram = sp.csr_matrix((source.num_items(), source.num_items()))
    for chunk in source.held_out(part):
        gram = gram + chunk.seen.T @ chunk.seen
    return gram


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
