"""The built-in demo: synthetic data -> files -> features -> model and baselines -> metrics.

Every step runs the same code a user's own data goes through: the generated tables
are written as Parquet and read back with the configured readers, split, the
features are fitted on the training split and saved, the two-tower model is
trained (``twotower train`` on the demo recipe) and exported as a serving artifact,
and it and each baseline are ranked against the whole corpus with seen items excluded.

Then the same data and recipe once more with a share of the items held out of training
(``split.new_items``, in ``new-items/``), the model's item ids dropped in training
(``IdFeature.dropout``) so that its item tower learns to place an item from its
features alone: it places those new items, where the baselines, which know an item
only by its interactions, score each of them 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import textwrap
import time
from importlib import resources
from pathlib import Path

import numpy as np

from twotower.baselines.config import BaselinesConfig
from twotower.baselines.run import BASELINES, evaluate_baseline
from twotower.config import Config, load_config, save_config
from twotower.data.config import DataConfig, FeatureTableConfig, InteractionsConfig
from twotower.data.dataset import ITEM_IDX, Dataset
from twotower.data.splits import Split, split_interactions
from twotower.data.synthetic import generate, write_parquet
from twotower.export import export_run
from twotower.features.dropout import dropout_rates
from twotower.features.specs import FeaturesConfig, IdFeature
from twotower.sources import MemorySource, load_data
from twotower.training.run import train_run

log = logging.getLogger(__name__)

CURVE_KS = (1, 2, 5, 10, 20, 50, 100)
NEW_ITEMS = 0.1  # the share of items the second run holds out (unless split.new_items says)
# the item ids' dropout of the second run (unless the config sets one): the rate chosen
# on MovieLens-100K's validation new items, which on the demo's own (three seeds) beats
# none too (docs/benchmarks.md, New items)
NEW_ITEMS_DROPOUT = 0.25
NEW_ITEMS_DIR = "new-items"
NEW_ITEM_COLUMNS = ["recall@10", "ndcg@10", "hr@10", "mrr@10", "recall@50"]


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What the demo measured.

    Attributes:
        metrics: model name -> flat metrics (``"test/recall@10"``, ...).
        out: the run folder (config, data, features, metrics.json, plot).
        seconds: wall time of each stage.
        new_items: the run with new items held out: model name -> its flat metrics,
            ``"test/new_items/recall@10"`` among them.
        held_out: how many items that run held out, and their test interactions.
        dropout: that run's item id features' dropout rates, by feature name.
    """

    metrics: dict[str, dict[str, float]]
    out: Path
    seconds: dict[str, float]
    new_items: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    held_out: tuple[int, int] = (0, 0)
    dropout: dict[str, float] = dataclasses.field(default_factory=dict)


def demo_config(overrides: list[str] | None = None) -> Config:
    """The packaged demo recipe, with optional ``key=value`` overrides."""
    recipe = resources.files("twotower") / "recipes" / "demo.yaml"
    with resources.as_file(recipe) as path:
        return load_config(path, overrides or [])


def run_demo(out: Path, overrides: list[str] | None = None) -> DemoResult:
    """Generates the synthetic data, trains and exports the model, evaluates it beside the
    baselines.

    Args:
        out: the run folder; created if needed.
        overrides: ``key=value`` changes to the demo recipe.
    """
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    config = demo_config(overrides)
    config = dataclasses.replace(config, data=_write_synthetic(config, out / "data"))
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    dataset, split = load_data(config)
    seconds["data"] = time.perf_counter() - clock

    clock = time.perf_counter()
    trained = train_run(config, out / "two-tower")
    seconds["training"] = time.perf_counter() - clock

    clock = time.perf_counter()
    export_run(out / "two-tower", out / "artifact")
    seconds["export"] = time.perf_counter() - clock

    clock = time.perf_counter()
    metrics = {
        "two-tower": trained.metrics,
        **evaluate_baselines(dataset, split, CURVE_KS, config.baselines),
    }
    seconds["baselines"] = time.perf_counter() - clock
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    plot_recall_curves(metrics, "test", out / "recall_at_k.png")

    clock = time.perf_counter()
    new_items, held_out = new_items_run(config, dataset, out / NEW_ITEMS_DIR)
    seconds["new items"] = time.perf_counter() - clock
    dropout = dropout_rates(with_item_id_dropout(config.features).item)
    return DemoResult(metrics, out, seconds, new_items, held_out, dropout)


def new_items_run(
    config: Config, dataset: Dataset, out: Path
) -> tuple[dict[str, dict[str, float]], tuple[int, int]]:
    """The model trained again and every baseline fitted with ``NEW_ITEMS`` of the items
    held out of training (or the config's ``split.new_items``), their metrics written
    into ``out/metrics.json``; the model's item ids are dropped at ``NEW_ITEMS_DROPOUT``
    (or the config's own rate).

    Returns:
        Model name -> flat metrics; the number of new items and of their interactions.
    """
    split_config = dataclasses.replace(config.split, new_items=config.split.new_items or NEW_ITEMS)
    config = dataclasses.replace(
        config, split=split_config, features=with_item_id_dropout(config.features)
    )
    split = split_interactions(dataset, split_config)
    trained = train_run(config, out / "two-tower")
    metrics = {
        "two-tower": trained.metrics,
        **evaluate_baselines(dataset, split, CURVE_KS, config.baselines),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    assert split.new_items is not None  # the split config above holds items out
    pairs = int(np.isin(split.test.column(ITEM_IDX).to_numpy(), split.new_items).sum())
    return metrics, (len(split.new_items), pairs)


def with_item_id_dropout(features: FeaturesConfig) -> FeaturesConfig:
    """The features with every item-side id that can drop (a vocabulary) and does not
    yet dropped at ``NEW_ITEMS_DROPOUT``."""
    item = [
        dataclasses.replace(spec, dropout=NEW_ITEMS_DROPOUT)
        if isinstance(spec, IdFeature) and not spec.hash_buckets and not spec.dropout
        else spec
        for spec in features.item
    ]
    return dataclasses.replace(features, item=item)


def _write_synthetic(config: Config, folder: Path) -> DataConfig:
    """Writes the generated tables as Parquet; returns the config that reads them back."""
    paths = write_parquet(generate(config.data.synthetic).dataset, folder)
    return DataConfig(
        source="files",
        interactions=InteractionsConfig(
            paths["interactions"], query_id="user_id", item_id="item_id", timestamp="timestamp"
        ),
        queries=FeatureTableConfig(paths["queries"], key="user_id"),
        items=FeatureTableConfig(paths["items"], key="item_id"),
        synthetic=config.data.synthetic,
    )


def evaluate_baselines(
    dataset: Dataset, split: Split, ks: tuple[int, ...], config: BaselinesConfig | None = None
) -> dict[str, dict[str, float]]:
    """Every baseline ranked on valid (fitted on train) and test (train + valid)."""
    results = {}
    for name in BASELINES:
        results[name] = evaluate_baseline(name, MemorySource(dataset, split), ks, config)
        log.info("%s: test/recall@10 = %.4f", name, results[name]["test/recall@10"])
    return results


def plot_recall_curves(metrics: dict[str, dict[str, float]], part: str, path: Path) -> None:
    """Saves Recall@K against K for each model as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in metrics.items():
        ks = sorted(int(k.split("@")[1]) for k in values if k.startswith(f"{part}/recall@"))
        ax.plot(ks, [values[f"{part}/recall@{k}"] for k in ks], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel(f"Recall@K ({part})")
    ax.set_title("Full-corpus recall, seen items excluded")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(metrics: dict[str, dict[str, float]], columns: list[str]) -> str:
    """A plain-text table: one row per model, one column per metric key."""
    width = max(len(c) for c in columns) + 2
    name_width = max(len("model"), *(len(n) for n in metrics)) + 2
    lines = ["model".ljust(name_width) + "".join(c.rjust(width) for c in columns)]
    lines.append("-" * len(lines[0]))
    for name, values in metrics.items():
        cells = "".join(f"{values[c]:.4f}".rjust(width) for c in columns)
        lines.append(name.ljust(name_width) + cells)
    return "\n".join(lines)


def format_new_items(result: DemoResult) -> str:
    """The demo's new-items table as printed: a title saying what it measures, then one
    row per model of its metrics on the new items' test interactions alone."""
    items, pairs = result.held_out
    title = textwrap.fill(
        f"New items: {items:,} items held out of training, all {pairs:,} of their "
        f"interactions in test (run folder {result.out / NEW_ITEMS_DIR}). The two-tower "
        "model can place an item it never trained on from its features, trained with its "
        f"item ids read as unknown at random ({_rates(result.dropout)}); popularity, "
        "item-KNN and EASE know an item only by its interactions, so they score every new "
        "item 0. The new items' test interactions alone, ranking the full corpus:",
        width=88,
        break_long_words=False,
        break_on_hyphens=False,
    )
    rows = {
        name: {c: values[f"test/new_items/{c}"] for c in NEW_ITEM_COLUMNS}
        for name, values in result.new_items.items()
    }
    return f"{title}\n\n{format_table(rows, NEW_ITEM_COLUMNS)}"


def _rates(dropout: dict[str, float]) -> str:
    """``item_id dropout 0.25``, for each dropping feature; ``no dropout`` without."""
    return ", ".join(f"{name} dropout {rate:g}" for name, rate in dropout.items()) or "no dropout"
