"""The self-supervised item loss (``training.self_supervised``) with and without, on
validation only: overall, and on the head and tail items.

    python benchmarks/self_supervised.py --ledger benchmarks/results/self-supervised/ledger.jsonl \
        [--datasets ml100k,ml1m,synthetic] [--variants off,uniform,batch] [--seeds 1,2]
        [--threads 1] [--epochs ml100k=10,...] [--set key=value ...]

Each run trains a shipped recipe (``configs/<dataset>.yaml``, its refit off) with one
variant's overrides (``VARIANTS``; ``--epochs`` caps a recipe's epochs alike for every
variant, where the machine is short of time), then ranks the validation part with its
best checkpoint three ways: every held-out item, only the head's and only the tail's.
The head is the 20% of items with the most training interactions (ties by item index),
the tail the other 80%; a query counts in a group when it holds out an item of that
group, and is ranked against the whole corpus as always. Each finished (dataset,
variant, seed) is one line of the ledger, not run again; test is never ranked or read
here. At the end the ledger is printed as one table per dataset (mean and spread over
seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from twotower.config import Config, apply_overrides, load_config
from twotower.data.dataset import ITEM_IDX
from twotower.data.splits import Split
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
METRICS = ("ndcg@10", "recall@10", "coverage@10")
HEAD_SHARE = 0.2
CPU = torch.device("cpu")


def run_config(dataset: str, variant: str, seed: int, threads: int, more: list[str]) -> Config:
    """The recipe with the variant's overrides and then ``more``, one seed, no refit,
    ``threads`` threads."""
    config = load_config(ROOT / "configs" / f"{dataset}.yaml", ["training.refit=false"])
    views = VIEWS[dataset] if VARIANTS[variant] else []
    overrides = [*VARIANTS[variant], *views, "training.tensorboard=false", *more]
    config = apply_overrides(config, overrides)
    return dataclasses.replace(config, seed=seed, threads=threads)


def head_items(train: pa.Table, num_items: int) -> np.ndarray:
    """(N,) bool: the ``HEAD_SHARE`` of items with the most training interactions."""
    counts = np.bincount(train[ITEM_IDX].to_numpy(), minlength=num_items)
    order = np.lexsort((np.arange(num_items), -counts))  # by count, then index
    head = np.zeros(num_items, dtype=bool)
    head[order[: int(round(HEAD_SHARE * num_items))]] = True
    return head


def group_metrics(model: TwoTower, data: TrainingExamples, ks: list[int]) -> dict[str, float]:
    """Validation metrics of the model on every held-out item, the head's and the
    tail's (``{group}/valid/{metric}``, ``{group}/valid/queries``)."""
    queries, items = embed_all(model, data, 1024)
    split = data.split
    head = head_items(split.train, data.num_items)

    def score(rows: np.ndarray) -> torch.Tensor:
        return interest_scores(queries[torch.from_numpy(rows)], items)

    result = {}
    for group, keep in (("all", None), ("head", head), ("tail", ~head)):
        valid = split.valid
        if keep is not None:
            valid = valid.filter(pc.is_in(valid[ITEM_IDX], pa.array(np.flatnonzero(keep))))
        part = Split(split.train, valid, split.test, split.examples)
        metrics = evaluate(score, part, "valid", len(queries), len(items), ks=ks)
        result.update({f"{group}/{name}": value for name, value in metrics.items()})
    return result


def train_one(config: Config) -> dict[str, float]:
    """Trains ``config`` as ``twotower train`` does, in a scratch folder, but ranks
    validation alone (test is never ranked); its best epoch and validation metrics."""
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
        return {"best_epoch": state.best_epoch, **group_metrics(model, data, config.training.ks)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def summary(ledger: Path) -> str:
    """The ledger as one markdown table per dataset: mean ± spread over seeds."""
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    lines = []
    for dataset in dict.fromkeys(e["dataset"] for e in entries):
        lines += [f"\n{dataset}\n", _header()]
        for variant in dict.fromkeys(e["variant"] for e in entries if e["dataset"] == dataset):
            rows = [e for e in entries if e["dataset"] == dataset and e["variant"] == variant]
            lines.append(_row(variant, rows))
    return "\n".join(lines)


def _header() -> str:
    names = [f"{g} {m}" for g in ("all", "tail", "head") for m in ("NDCG@10", "Recall@10")]
    columns = ["variant", "seeds", *names, "coverage@10", "tail queries"]
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def _row(variant: str, rows: list[dict]) -> str:
    def cell(key: str) -> str:
        values = [r[key] for r in rows]
        return f"{np.mean(values):.4f} ± {np.std(values):.4f}"

    keys = [f"{g}/valid/{m}" for g in ("all", "tail", "head") for m in ("ndcg@10", "recall@10")]
    cells = [cell(k) for k in [*keys, "all/valid/coverage@10"]]
    queries = int(rows[0]["tail/valid/queries"])
    return f"| {variant} | {len(rows)} | " + " | ".join(cells) + f" | {queries} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ledger", type=Path, required=True)
    parser.add_argument("--datasets", default="ml100k,ml1m")
    parser.add_argument("--variants", default="off,uniform,batch")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--epochs", default="", help="shorter runs: dataset=N,... caps each recipe's epochs"
    )
    parser.add_argument("--set", action="append", default=[], help="more overrides, every run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    lines = args.ledger.read_text().splitlines() if args.ledger.is_file() else []
    done = {(e["dataset"], e["variant"], e["seed"]) for e in map(json.loads, lines)}
    args.ledger.parent.mkdir(parents=True, exist_ok=True)
    epochs = dict(item.split("=") for item in args.epochs.split(",") if item)
    runs = [  # every variant of every dataset once before the next seed
        (dataset, variant, seed)
        for seed in map(int, args.seeds.split(","))
        for dataset in args.datasets.split(",")
        for variant in args.variants.split(",")
    ]
    for dataset, variant, seed in runs:
        if (dataset, variant, seed) in done:
            continue
        more = [*args.set, *([f"training.epochs={epochs[dataset]}"] if dataset in epochs else [])]
        metrics = train_one(run_config(dataset, variant, seed, args.threads, more))
        entry = {"dataset": dataset, "variant": variant, "seed": seed, **metrics}
        with args.ledger.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
        shown = {k: round(v, 4) for k, v in metrics.items() if k.endswith(("ndcg@10", "recall@10"))}
        print(dataset, variant, seed, shown, flush=True)
    print(summary(args.ledger))


if __name__ == "__main__":
    main()
