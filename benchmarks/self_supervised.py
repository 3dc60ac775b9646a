"""The self-supervised item loss (``training.self_supervised``) with and without, on
validation only: overall, and by the project's item and query groups.

    python benchmarks/self_supervised.py --ledger benchmarks/results/self-supervised/ledger.jsonl \
        [--datasets ml100k,synthetic,ml1m] [--variants off,uniform,batch] [--seeds 1,2,3]
        [--threads 1] [--epochs ml1m=10,...] [--set key=value ...] [--plot PNG]

Each run trains a shipped recipe (``configs/<dataset>.yaml``, its refit off) as it is
shipped (its epochs, its early stopping), with one variant's overrides (``VARIANTS``),
then ranks the validation part with its best checkpoint against the whole corpus, the
metrics by group beside (``twotower.evaluation.groups``: items by their share of the
training interactions, head / torso / tail / new; queries by their training count,
few / some / many). ``--epochs`` caps a recipe's epochs alike for every variant, where
the machine is short of time: each ledger line records its epoch budget and whether it
was capped, and the tables name a capped row as such. Each finished (dataset, variant,
seed) is one line of the ledger, never run again; test is never ranked or read here.
At the end the ledger is printed as one table per dataset (mean ± standard deviation
over seeds), and plotted where ``--plot`` asks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from twotower.config import Config, apply_overrides, load_config
from twotower.evaluation.ranking import evaluate
from twotower.sources import open_source
from twotower.threads import set_threads
from twotower.towers.model import TwoTower, interest_scores
from twotower.training.evaluate import embed_all
from twotower.training.examples import EXAMPLES, TrainingExamples
from twotower.training.saved import checkpoint_extra
from twotower.training.trainer import RunPlan, Trainer

ROOT = Path(__file__).resolve().parents[1]
SSL = "training.self_supervised"
# what each dataset's recipe lets the views be: ML-1M's items are their id alone, so
# masking is refused there and the views differ by dropout on the id's vector
VIEWS = {
    "ml100k": [f"{SSL}.mask=0.5"],
    "synthetic": [f"{SSL}.mask=0.5"],
    "ml1m": [f"{SSL}.dropout=0.2", f"{SSL}.mask=0"],
}
VARIANTS = {
    "off": [],
    "uniform": [f"{SSL}.weight=0.1", f"{SSL}.items=uniform"],
    "batch": [f"{SSL}.weight=0.1", f"{SSL}.items=batch"],
    "uniform-w0.3": [f"{SSL}.weight=0.3", f"{SSL}.items=uniform"],
}
# the table's columns: overall, then the groups the loss is meant for and against
GROUPS = {"all": "valid/", "tail": "valid/groups/item:tail/", "head": "valid/groups/item:head/"}
GROUPS["few"] = "valid/groups/query:few/"
LABELS = {"ndcg@10": "NDCG@10", "recall@10": "Recall@10", "recall@50": "Recall@50"}
# (group, metric) of each column; the tail's Recall@50 too, where @10 is near the floor
COLUMNS = [(g, m) for g in GROUPS for m in ("ndcg@10", "recall@10")] + [("tail", "recall@50")]
CPU = torch.device("cpu")


def run_config(dataset: str, variant: str, seed: int, threads: int, more: list[str]) -> Config:
    """The recipe with the variant's overrides and then ``more``, one seed, no refit,
    ``threads`` threads."""
    config = load_config(ROOT / "configs" / f"{dataset}.yaml", ["training.refit=false"])
    views = VIEWS[dataset] if VARIANTS[variant] else []
    overrides = [*VARIANTS[variant], *views, "training.tensorboard=false", *more]
    config = apply_overrides(config, overrides)
    return dataclasses.replace(config, seed=seed, threads=threads)


def valid_metrics(model: TwoTower, data: TrainingExamples, ks: list[int]) -> dict[str, float]:
    """The model's validation metrics over the whole corpus, with the metrics by group
    (``valid/...``, ``valid/groups/item:tail/...``)."""
    queries, items = embed_all(model, data, 1024)

    def score(rows) -> torch.Tensor:
        return interest_scores(queries[torch.as_tensor(rows)], items)

    return evaluate(score, data.split, "valid", len(queries), len(items), ks=ks, groups=True)


def train_one(config: Config) -> dict[str, float]:
    """Trains ``config`` as ``twotower train`` does, in a scratch folder, but ranks
    validation alone (test is never ranked); its epochs and validation metrics."""
    set_threads(config.threads)
    folder = Path(tempfile.mkdtemp(prefix="ssl-run-"))
    try:
        source = open_source(config)
        features = source.fit_features(config, None)
        data = source.examples(EXAMPLES[config.training.examples], config, features, CPU)
        torch.manual_seed(config.seed)  # as the run does, after the data is ready
        model = TwoTower.build(config.model, config.features, data.pipeline)
        extra = checkpoint_extra(config, data.pipeline)
        trainer = Trainer(model, data, RunPlan(config.training), folder, config.seed, extra)
        state = trainer.fit()
        model.load_state_dict(trainer.store.load("best")["model"])
        epochs = {"best_epoch": state.best_epoch, "last_epoch": state.epoch}
        return {**epochs, **valid_metrics(model, data, config.training.ks)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def read_ledger(ledger: Path) -> list[dict]:
    """The ledger's entries, in the order they were run (none if it does not exist)."""
    lines = ledger.read_text().splitlines() if ledger.is_file() else []
    return [json.loads(line) for line in lines]


def rows(entries: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """The entries by (dataset, row name): a variant, named apart where capped."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for e in entries:
        name = e["variant"] + (f" (capped at {e['epochs']} epochs)" if e["capped"] else "")
        grouped.setdefault((e["dataset"], name), []).append(e)
    return grouped


def mean_spread(entries: list[dict], key: str) -> tuple[float, float]:
    """The mean of ``key`` over the entries and its standard deviation (0 for one)."""
    values = [e[key] for e in entries]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), spread


def summary(entries: list[dict]) -> str:
    """The ledger as one markdown table per dataset: mean ± spread over seeds."""
    names = [f"{g} {LABELS[m]}" for g, m in COLUMNS]
    columns = ["variant", "seeds", "best epochs", *names]
    lines = []
    for dataset in dict.fromkeys(e["dataset"] for e in entries):
        sizes = _group_sizes(next(e for e in entries if e["dataset"] == dataset))
        lines += [f"\n{dataset} (validation; {sizes})\n"]
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for (where, name), runs in rows(entries).items():
            if where != dataset:
                continue
            cells = [f"{m:.4f} ± {s:.4f}" for m, s in _cells(runs)]
            best = ", ".join(str(r["best_epoch"]) for r in runs)
            lines.append(f"| {name} | {len(runs)} | {best} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cells(runs: list[dict]) -> list[tuple[float, float]]:
    return [mean_spread(runs, GROUPS[g] + m) for g, m in COLUMNS]


def _group_sizes(entry: dict) -> str:
    """How many validation queries each column counts, and the groups' training counts."""
    parts = [f"all {entry['valid/queries']:.0f} queries"]
    for group, prefix in list(GROUPS.items())[1:]:
        low, high = entry[prefix + "min_count"], entry[prefix + "max_count"]
        parts.append(f"{group} {entry[prefix + 'queries']:.0f} ({low:.0f}-{high:.0f})")
    return ", ".join(parts)


def plot(entries: list[dict], path: Path, metric: str = "ndcg@10") -> None:
    """A PNG of ``metric`` by column (all, tail, head, few), one panel per dataset, a
    bar per row with its spread over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(e["dataset"] for e in entries))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        named = {n: r for (d, n), r in rows(entries).items() if d == dataset}
        width = 0.8 / len(named)
        for i, (name, runs) in enumerate(named.items()):
            stats = [mean_spread(runs, prefix + metric) for prefix in GROUPS.values()]
            x = [g + (i - (len(named) - 1) / 2) * width for g in range(len(GROUPS))]
            ax.bar(x, [m for m, _ in stats], width, yerr=[s for _, s in stats], label=name)
        ax.set_xticks(range(len(GROUPS)), list(GROUPS))
        ax.set_title(f"{dataset}: validation {LABELS[metric]} (± sd over seeds)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ledger", type=Path, required=True)
    parser.add_argument("--datasets", default="ml100k,synthetic")
    parser.add_argument("--variants", default="off,uniform,batch")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--epochs", default="", help="shorter runs: dataset=N,... caps each recipe's epochs"
    )
    parser.add_argument("--set", action="append", default=[], help="more overrides, every run")
    parser.add_argument("--plot", type=Path, help="a PNG of the ledger's NDCG@10 by column")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    done = {(e["dataset"], e["variant"], e["seed"]) for e in read_ledger(args.ledger)}
    args.ledger.parent.mkdir(parents=True, exist_ok=True)
    caps = dict(item.split("=") for item in args.epochs.split(",") if item)
    runs = [  # every variant of every dataset once before the next seed
        (dataset, variant, seed)
        for seed in map(int, args.seeds.split(","))
        for dataset in args.datasets.split(",")
        for variant in args.variants.split(",")
    ]
    for dataset, variant, seed in runs:
        if (dataset, variant, seed) in done:
            continue
        cap = [f"training.epochs={caps[dataset]}"] if dataset in caps else []
        config = run_config(dataset, variant, seed, args.threads, [*args.set, *cap])
        metrics = train_one(config)
        shipped = load_config(ROOT / "configs" / f"{dataset}.yaml").training.epochs
        budget = {"epochs": config.training.epochs, "capped": config.training.epochs < shipped}
        budget["overrides"] = [*args.set, *cap]
        entry = {"dataset": dataset, "variant": variant, "seed": seed, **budget, **metrics}
        with args.ledger.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
        shown = {c: round(metrics[p + "ndcg@10"], 4) for c, p in GROUPS.items()}
        print(dataset, variant, seed, "NDCG@10", shown, flush=True)
    entries = read_ledger(args.ledger)
    print(summary(entries))
    if args.plot:
        plot(entries, args.plot)


if __name__ == "__main__":
    main()
