"""Baselines behind the same evaluator as the model: fit, rank the full corpus, report.

Each step sees the interactions known before it: a baseline ranking the validation
split is fitted on train; the one ranking the test split on train + validation,
exactly as the model's histories are at that step.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from twotower.baselines.config import BaselinesConfig
from twotower.baselines.ease import EASE
from twotower.baselines.itemknn import ItemKNN
from twotower.baselines.popularity import Popularity
from twotower.data.dataset import Dataset
from twotower.data.matrix import known_before
from twotower.data.splits import Split
from twotower.evaluation.ranking import evaluate
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


def write_metrics(metrics: dict[str, Any], path: Path) -> None:
    """``metrics.json``, written atomically."""
    text = json.dumps(metrics, indent=2, sort_keys=True).encode("utf-8")
    atomic_write(path, lambda f: f.write(text))
